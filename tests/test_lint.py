"""Static check of the whole tree: unused imports, undefined names, dead f-strings."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyflakes_is_clean():
    r = subprocess.run([sys.executable, "-m", "pyflakes", "rci_fast", "sandbox", "kernels", "bench", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout == "" and r.returncode == 0, r.stdout

"""The rci-fast command line, run as a user would run it."""
import json
import subprocess
import sys


def rci(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "rci_fast", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = rci("--help")
    assert r.returncode == 0 and "sandbox" in r.stdout
    r = rci("sandbox", "run", "--help")
    assert r.returncode == 0 and "--timeout" in r.stdout


def test_sandbox_run_file_and_stdin(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(4)\n")
    r = rci("sandbox", "run", str(f))
    assert (r.returncode, r.stdout, r.stderr) == (4, "out\n", "err\n")
    r = rci("sandbox", "run", "--json", "-", stdin="print(6 * 7)")
    result = json.loads(r.stdout)
    assert result["status"] == "ok" and result["stdout"] == "42\n"


def test_sandbox_run_reports_sandbox_endings():
    r = rci("sandbox", "run", "--timeout", "0.3", "-", stdin="while True: pass")
    assert r.returncode == 125 and "[sandbox: timeout]" in r.stderr


def test_missing_file_and_unknown_command_fail_clearly(tmp_path):
    r = rci("sandbox", "run", str(tmp_path / "nope.py"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = rci("sandbx")
    assert r.returncode == 2 and "invalid choice" in r.stderr

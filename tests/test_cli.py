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


def test_bad_arguments_get_usage_errors_not_tracebacks(tmp_path):
    for args in (["sandbox", "run", "--timeout", "0", "-"], ["sandbox", "run", "--memory-mb", "x", "-"],
                 ["sandbox", "bench", "-n", "0"]):
        r = rci(*args, stdin="print(1)")
        assert r.returncode == 2 and "Traceback" not in r.stderr and "error: argument" in r.stderr, r.stderr
    r = rci("gen-sft", "--print-config")  # the command's own usage, not the top-level one
    assert r.returncode == 2 and r.stderr.startswith("usage: rci-fast gen-sft")
    r = rci("gen-sft", "--out", str(tmp_path))
    assert r.returncode == 2 and "is a folder" in r.stderr


def test_gen_sft_creates_the_output_folder(tmp_path):
    out = tmp_path / "new" / "deeper" / "sft.jsonl"
    r = rci("gen-sft", "--out", str(out), "--per-family", "2", "--families", "gcd")
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2 and sorted(p.name for p in out.parent.iterdir()) == ["sft.jsonl"]

"""The sandbox's Python API on real runs: statuses, limits, sessions, concurrency, recovery."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from rci_fast.sandbox import Sandbox, SandboxError


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=5.0) as box:
        yield box


def test_import_does_not_pull_torch():
    code = "import sys, rci_fast.sandbox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_print_one(sb):
    r = sb.run("print(1)")
    assert (r.status, r.stdout, r.stderr, r.exit_code) == ("ok", "1\n", "", 0)
    assert 0 < r.wall_ms < 1000


def test_exception_gives_error_with_traceback(sb):
    r = sb.run("x = 1\nprint('before')\n1 / x / 0\n")
    assert r.status == "error" and r.exit_code == 1
    assert r.stdout == "before\n"
    assert 'File "<code>", line 3' in r.stderr and "ZeroDivisionError" in r.stderr
    assert "_zygote" not in r.stderr  # the sandbox's own frames are hidden


@pytest.mark.parametrize("code,status,exit_code,stderr_has", [
    ("", "ok", 0, ""),
    ("raise SystemExit", "ok", 0, ""),
    ("import sys; sys.exit(0)", "ok", 0, ""),
    ("import sys; sys.exit(3)", "error", 3, ""),
    ("import sys; sys.exit('bad input')", "error", 1, "bad input"),
    ("def f(:\n  pass", "error", 1, "SyntaxError"),
    ("raise KeyboardInterrupt", "error", 1, "KeyboardInterrupt"),
    ("import os; os._exit(7)", "error", 7, ""),
])
def test_exit_paths(sb, code, status, exit_code, stderr_has):
    r = sb.run(code)
    assert (r.status, r.exit_code) == (status, exit_code), r
    assert stderr_has in r.stderr


def test_timeout_is_enforced_quickly(sb):
    t0 = time.monotonic()
    r = sb.run("while True:\n    pass", timeout_s=0.5)
    assert r.status == "timeout"
    assert 450 <= r.wall_ms < 1500 and time.monotonic() - t0 < 3


def test_sleep_forever_times_out(sb):
    r = sb.run("import time\nprint('start', flush=True)\ntime.sleep(10**6)", timeout_s=0.3)
    assert r.status == "timeout" and r.stdout == "start\n"


def test_memory_limit(sb):
    r = sb.run("x = bytearray(2 << 30)", memory_mb=256)
    assert r.status == "memory_limit" and "MemoryError" in r.stderr
    r = sb.run("import numpy as np\na = np.ones((1 << 30,), dtype=np.float64)", memory_mb=256)
    assert r.status == "memory_limit"
    assert sb.run("x = bytearray(64 << 20); print(len(x))", memory_mb=256).stdout == f"{64 << 20}\n"


def test_output_is_capped_and_run_stopped(sb):
    t0 = time.monotonic()
    r = sb.run("while True:\n    print('x' * 1000)", max_output_bytes=10_000)
    assert r.status == "output_limit" and r.stdout_truncated
    assert len(r.stdout) == 10_000 and time.monotonic() - t0 < 2
    r = sb.run("import sys\nwhile True:\n    sys.stderr.write('e' * 4096)", max_output_bytes=5000)
    assert r.status == "output_limit" and r.stderr_truncated and len(r.stderr) == 5000


def test_non_utf8_and_unencodable_output(sb):
    r = sb.run("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end')\nprint('\\udc80')")
    assert r.status == "ok"
    assert r.stdout.startswith("ok \ufffd\ufffd end") and "\\udc80" in r.stdout


def test_closing_stdout_is_harmless(sb):
    r = sb.run("import os, sys\nprint('a', flush=True)\nos.close(1)\nprint('b')")
    assert r.status in ("ok", "error") and r.stdout == "a\n"
    r = sb.run("import sys\nsys.stdout.close()\nsys.stderr.close()")
    assert r.status == "ok"


def test_threads_work_and_do_not_outlive_the_run(sb):
    code = ("import threading, time\n"
            "res = []\n"
            "ts = [threading.Thread(target=lambda i=i: res.append(i * i)) for i in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "threading.Thread(target=lambda: time.sleep(100), daemon=True).start()\n"
            "print(sorted(res))")
    r = sb.run(code)
    assert r.status == "ok" and r.stdout == "[0, 1, 4, 9, 16, 25, 36, 49]\n"
    assert r.wall_ms < 1000


def test_warm_modules_cost_no_import_time(sb):
    code = ("import numpy as np, sympy as sp\nx = sp.Symbol('x')\n"
            "print(sp.solve(x**2 - 4, x), int(np.arange(10).sum()))")
    r = sb.run(code)
    assert r.status == "ok" and r.stdout == "[-2, 2] 45\n"
    assert r.wall_ms < 100  # a cold `import sympy` alone takes ~1 s here


def test_big_integers_print(sb):
    r = sb.run("print(len(str(7 ** 20000)))")
    assert r.status == "ok" and r.stdout == "16902\n"


def test_no_state_leaks_between_runs(sb):
    sb.run("import builtins, os, sys\nbuiltins.leak = 1\nsys.leak = 1\nos.environ['LEAK'] = '1'\n"
           "open('leak.txt', 'w').write('x')\nimport json\njson.leak = 1\nglobal_leak = 1")
    for _ in range(4):  # every worker
        r = sb.run("import builtins, os, sys, json\n"
                   "print(hasattr(builtins, 'leak'), hasattr(sys, 'leak'), 'LEAK' in os.environ, "
                   "os.path.exists('leak.txt'), hasattr(json, 'leak'), 'global_leak' in globals())")
        assert r.stdout == "False False False False False False\n"


def test_each_run_gets_fresh_randomness(sb):
    outs = {sb.run("import random, numpy as np; print(random.random(), np.random.rand())").stdout
            for _ in range(4)}
    assert len(outs) == 4


def test_a_seed_makes_every_run_start_alike():
    """Two sandboxes (two template processes) with one seed: every run prints the same random
    numbers, str hash and set order; without a seed, hashes differ between templates."""
    code = "import random, numpy as np\nprint(random.random(), np.random.rand(), hash('abc'), list(set('abcdefgh')))"
    outs = []
    for _ in range(2):
        with Sandbox(workers=1, seed=7) as box:
            outs += [box.run(code).stdout for _ in range(2)]
    assert outs[0] and len(set(outs)) == 1, outs
    hashes = set()
    for _ in range(2):
        with Sandbox(workers=1) as box:
            hashes.add(box.run("print(hash('abc'))").stdout)
    assert len(hashes) == 2
    with pytest.raises(ValueError, match="seed"):
        Sandbox(workers=1, seed=-1)


def test_code_can_import_a_module_it_wrote(sb):
    r = sb.run("open('helper.py', 'w').write('def f():\\n    return 41 + 1\\n')\n"
               "import helper\nprint(helper.f())")
    assert r.status == "ok" and r.stdout == "42\n", r.stderr


def test_files_take_any_mode_but_set_uid_and_set_gid(sb):
    r = sb.run("import os, stat\n"
               "fd = os.open('a', os.O_CREAT | os.O_WRONLY, 0o640)\nos.close(fd)\n"
               "os.chmod('a', 0o1755)\nopen('b', 'w').close()\nos.chmod('b', 0o600)\n"
               "print(oct(stat.S_IMODE(os.stat('a').st_mode)), oct(stat.S_IMODE(os.stat('b').st_mode)))\n"
               "for mode in (0o4755, 0o2755):\n"
               "    try:\n"
               "        os.chmod('a', mode)\n"
               "    except PermissionError:\n"
               "        print('refused')\n")
    assert r.status == "ok" and r.stdout.split() == ["0o1755", "0o600", "refused", "refused"], r


def test_scratch_folder_is_private_and_writable(sb):
    r = sb.run("import os, tempfile\nopen('a.txt', 'w').write('hi')\n"
               "with tempfile.NamedTemporaryFile('w', delete=False) as f: f.write('t')\n"
               "print(open('a.txt').read(), os.path.dirname(f.name) == os.getcwd())")
    assert r.status == "ok" and r.stdout == "hi True\n"


def test_environment_is_scrubbed():
    os.environ["RCI_TEST_HOST_SECRET"] = "hunter2"
    try:
        with Sandbox(workers=1) as box:
            r = box.run("import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())")
    finally:
        del os.environ["RCI_TEST_HOST_SECRET"]
    assert "hunter2" not in r.stdout and "RCI_TEST_HOST_SECRET" not in r.stdout
    assert "PATH" in r.stdout
    assert r.status == "error"  # /proc is not readable at all


def test_run_many_keeps_order_and_uses_both_workers(sb):
    codes = [f"import time, os\ntime.sleep(0.2)\nprint({i}, os.getppid())" for i in range(4)]
    t0 = time.monotonic()
    rs = sb.run_many(codes)
    elapsed = time.monotonic() - t0
    assert [r.stdout.split()[0] for r in rs] == ["0", "1", "2", "3"]
    assert len({r.stdout.split()[1] for r in rs}) == 2  # two different workers
    assert elapsed < 0.75  # 4 x 0.2 s on 2 workers: ~0.4 s, not 0.8 s


def test_submit_is_non_blocking(sb):
    t0 = time.monotonic()
    fut = sb.submit("import time; time.sleep(0.3); print('done')")
    assert time.monotonic() - t0 < 0.1
    assert fut.result(timeout=5).stdout == "done\n"


def test_session_keeps_variables_and_files(sb):
    with sb.session() as s:
        assert s.run("x = 41\nopen('f.txt', 'w').write('kept')").status == "ok"
        r = s.run("x += 1\nprint(x, open('f.txt').read())")
        assert r.stdout == "42 kept\n"
        r = s.run("print(y)")
        assert r.status == "error" and "NameError" in r.stderr
        assert s.run("print(x)").stdout == "42\n"  # an exception does not end the session
    assert s.closed
    assert s.run("print(x)").status == "error"


def test_session_ends_after_timeout_and_fresh_runs_stay_isolated(sb):
    s = sb.session()
    s.run("secret = 'session-only'")
    assert "secret" not in sb.run("print(dir())").stdout
    r = s.run("while True: pass", timeout_s=0.3)
    assert r.status == "timeout" and s.closed
    r = s.run("print(secret)")
    assert r.status == "error" and "session ended" in r.stderr


def test_many_sessions_share_workers(sb):
    sessions = [sb.session() for _ in range(6)]
    for i, s in enumerate(sessions):
        s.run(f"v = {i}")
    assert [s.run("print(v)").stdout for s in sessions] == [f"{i}\n" for i in range(6)]
    for s in sessions:
        s.close()


def test_a_session_that_stops_reading_its_code_times_out_alone():
    """A session's code points its control descriptor (3) at a pipe of its own: the worker's
    write of the next code, larger than the control pipe holds, waits only until that run's
    deadline (it blocked the worker for good before), and another session on the same worker
    lives on."""
    with Sandbox(workers=1, timeout_s=5.0) as box:
        victim = box.session()
        assert victim.run("x = 1").status == "ok"
        s = box.session()
        assert s.run("import os\nkeep = os.dup(3)\nr, w = os.pipe()\nos.dup2(r, 3)").status == "ok"
        t0 = time.monotonic()
        r = s.run("#" + "x" * (256 << 10), timeout_s=1.0)
        assert r.status == "timeout" and time.monotonic() - t0 < 3.0 and s.closed
        assert victim.run("print(x)").stdout == "1\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="runs under another uid need root")
def test_runs_under_another_uid_die_with_their_worker():
    """The uid change clears the parent-death signal set at the fork: the run child sets it
    again, or a run outlives its killed worker as an orphan."""
    with Sandbox(workers=1, timeout_s=20.0, run_uid=65534) as box:
        assert box.run("import os\nprint(os.getuid())").stdout == "65534\n"
        box.submit("import time\ntime.sleep(15)")
        time.sleep(0.5)
        worker = box.worker_pids[0]
        children = [pid for pid in _children(worker) if _uid(pid) == 65534]
        assert children
        os.kill(worker, 9)
        deadline = time.monotonic() + 3.0
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in children if _alive(pid)]
        for pid in left:
            os.kill(pid, 9)
        assert not left


@pytest.mark.skipif(os.geteuid() != 0, reason="runs under another uid need root")
def test_each_worker_has_its_own_uid_and_thread_budget():
    """RLIMIT_NPROC (max_threads) counts every process of a uid: with 70 of this test's own
    bystanders running as nobody, a run as nobody cannot start a thread (the premise: 8 ranks'
    sandboxes, or one on a large machine, exhaust the shared count with their spares alone),
    while runs under per-worker uids can; the two workers' runs have distinct uids."""
    from rci_fast.sandbox.pool import worker_uid

    thread = "import threading\nt = threading.Thread(target=print, args=('ok',))\nt.start()\nt.join()"
    bystanders = [subprocess.Popen(["sleep", "60"], user=65534, group=65534, extra_groups=[])
                  for _ in range(70)]
    try:
        with Sandbox(workers=1, run_uid=65534) as box:
            r = box.run(thread)
            assert r.status == "error" and "can't start new thread" in r.stderr
        with Sandbox(workers=2, run_uid="per_worker") as box:
            assert [r.stdout for r in box.run_many([thread] * 4)] == ["ok\n"] * 4
            # two runs that overlap in time take both workers
            uids = {int(r.stdout) for r in box.run_many(["import os, time\ntime.sleep(0.5)\nprint(os.getuid())"] * 2)}
            assert uids == {worker_uid(pid) for pid in box.worker_pids} and len(uids) == 2
    finally:
        for p in bystanders:
            p.kill()
            p.wait()
    for bad in ("nobody", True, -1):
        with pytest.raises(ValueError, match="run_uid"):
            Sandbox(workers=1, run_uid=bad)


def _children(pid):
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(p))
        except (OSError, IndexError):
            pass
    return found


def _uid(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(f.read().split("Uid:")[1].split()[0])
    except (OSError, IndexError):
        return -1


def _alive(pid):
    return os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)


def test_runs_cannot_read_the_folder_python_started_from(tmp_path):
    """Under `python -m` sys.path[0] is the current folder (absolute): it is not granted to runs,
    nor is the current folder (a project's runs and data must stay out of a run's reach)."""
    (tmp_path / "secret.txt").write_text("project-secret")
    (tmp_path / "probe_read.py").write_text(
        "from rci_fast.sandbox import Sandbox\n"
        "with Sandbox(workers=1) as sb:\n"
        f"    r = sb.run({'print(open(%r).read())' % str(tmp_path / 'secret.txt')!r})\n"
        "    print(r.status, 'project-secret' in r.stdout)\n")
    r = subprocess.run([sys.executable, "-m", "probe_read"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["error", "False"], r.stdout + r.stderr


def test_a_kernel_without_landlock_gets_a_warning(monkeypatch):
    from rci_fast.sandbox import pool
    monkeypatch.setattr(pool._core, "landlock_abi", lambda: 0)
    with pytest.warns(RuntimeWarning, match="no Landlock"):
        with Sandbox(workers=1) as box:
            assert box.isolation["landlock_abi"] == 0


def test_bad_arguments_fail_clearly(sb):
    with pytest.raises(TypeError, match="unknown sandbox limit"):
        sb.run("print(1)", memory_gb=1)
    with pytest.raises(ValueError, match="invalid sandbox limits"):
        sb.run("print(1)", timeout_s=0)
    with pytest.raises(ValueError):
        Sandbox(workers=1, memory_mb=-1)


def test_survives_a_killed_worker():
    with Sandbox(workers=1) as box:
        os.kill(box.worker_pids[0], 9)
        r = box.run("print(1)")
        assert r.status == "error" and "restarted" in r.stderr
        assert box.run("print(2)").stdout == "2\n"


def test_close_leaves_nothing_behind():
    box = Sandbox(workers=2)
    box.run("print(1)")
    pids = [box.template_pid, *box.worker_pids]
    root = box.scratch_root
    box.close()
    time.sleep(0.1)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    assert not os.path.exists(root)
    with pytest.raises(SandboxError):
        box.run("print(1)")


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.geteuid() != 0, reason="the private tmpfs needs root")
def test_scratch_lives_on_a_capped_private_tmpfs():
    with Sandbox(workers=1, scratch_mb=64, scratch_files=2000) as box:
        assert box.isolation["scratch"].startswith("private tmpfs")
        r = box.run("i = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1")
        assert r.status == "error" and "No space left on device" in r.stderr
        r = box.run("open('big', 'wb').write(b'0' * (100 << 20))", max_file_mb=200)
        assert r.status == "error" and "No space left on device" in r.stderr
        assert box.run("print(1)").stdout == "1\n"  # the worker cleaned up and goes on
        assert os.listdir(box.scratch_root) == ["template.log"]  # nothing reached the disk


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_machine_that_refuses_the_lockdown_fails_at_start_with_the_reason():
    """In a user namespace that maps only root, the run uid cannot own the run's folder: the
    sandbox must refuse to start and say which step failed, not hand out one that errors on
    every run."""
    code = ("from rci_fast.sandbox import Sandbox, SandboxError\n"
            "try:\n    Sandbox(workers=1, run_uid=12345)\n"
            "except SandboxError as e:\n    print('REFUSED', e)\n")
    r = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert "REFUSED the sandbox cannot run code on this machine" in r.stdout, r.stdout + r.stderr
    assert "chown of the run's folder to the run uid: Invalid argument" in r.stdout


def test_a_run_can_only_lower_the_limits_it_was_given(sb):
    """Runs set their own rlimits, so the filter lets a run change its own limits: lowering one it
    was given works; raising a hard one fails (no capabilities); any other limit stays as it was,
    even set to its current value (the filter, not the kernel, refuses that)."""
    code = ("import resource as r\n"
            "soft, hard = r.getrlimit(r.RLIMIT_NOFILE)\n"
            "r.setrlimit(r.RLIMIT_NOFILE, (soft // 2, hard // 2))\n"
            "print(r.getrlimit(r.RLIMIT_NOFILE) == (soft // 2, hard // 2))\n"
            "for res, new in [(r.RLIMIT_NOFILE, (hard, hard)), (r.RLIMIT_CPU, (10**6, 10**6)),\n"
            "                 (r.RLIMIT_STACK, r.getrlimit(r.RLIMIT_STACK))]:\n"
            "    try:\n"
            "        r.setrlimit(res, new)\n"
            "        print('changed')\n"
            "    except (OSError, ValueError) as e:\n"
            "        print(type(e).__name__)\n")
    r = sb.run(code)
    assert r.status == "ok" and r.stdout.split() == ["True", "ValueError", "ValueError", "ValueError"], r


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_runs_keep_their_limits_where_root_lacks_cap_sys_resource():
    """Root without CAP_SYS_RESOURCE (a container's default, the lent GPU machines'): the worker
    may not set another uid's rlimits, so each run sets its own. Runs as an unprivileged uid
    still start, time out and hit their memory and file-size limits."""
    code = ("from rci_fast.sandbox import Sandbox\n"
            "with Sandbox(workers=1, run_uid=65534) as sb:\n"
            "    print(sb.run('print(6 * 7)').stdout.strip(),\n"
            "          sb.run('while True: pass', timeout_s=0.5).status,\n"
            "          sb.run('x = bytearray(2 << 30)', memory_mb=256).status)\n"
            "    r = sb.run('open(\"f\", \"w\").write(\"x\" * (2 << 20))', max_file_mb=1)\n"
            "    print(r.status, 'File too large' in r.stderr)\n")
    r = subprocess.run(["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["42", "timeout", "memory_limit", "error", "True"], r.stdout + r.stderr

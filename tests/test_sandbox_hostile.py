"""The attack corpus (tests/hostile_corpus.py) and a long soak, run against the real sandbox.

The corpus runs inside fresh mount/pid/net namespaces and a cgroup capping its pids and memory,
so that a sandbox bug could only hurt that throw-away world, never this machine.
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from rci_fast.sandbox import Sandbox

HERE = os.path.dirname(os.path.abspath(__file__))


class _Cgroup:
    """A cgroup (v1 or v2) with pids and memory caps; processes are moved in by the caller."""

    def __init__(self, pids_max: int, memory_bytes: int):
        name = f"rci-corpus-{uuid.uuid4().hex[:8]}"
        if os.path.isdir("/sys/fs/cgroup/pids") and os.path.isdir("/sys/fs/cgroup/memory"):
            self.dirs = [f"/sys/fs/cgroup/pids/{name}", f"/sys/fs/cgroup/memory/{name}"]
            settings = {self.dirs[0]: {"pids.max": pids_max},
                        self.dirs[1]: {"memory.limit_in_bytes": memory_bytes}}
        else:
            self.dirs = [f"/sys/fs/cgroup/{name}"]
            settings = {self.dirs[0]: {"pids.max": pids_max, "memory.max": memory_bytes}}
        for d, values in settings.items():
            os.mkdir(d)
            for key, value in values.items():
                with open(os.path.join(d, key), "w") as f:
                    f.write(str(value))

    def enter_command(self) -> str:
        return "; ".join(f"echo $$ > {d}/cgroup.procs" for d in self.dirs)

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.1)


needs_root_x86 = pytest.mark.skipif(
    os.geteuid() != 0 or platform.machine() != "x86_64" or shutil.which("unshare") is None,
    reason="the corpus needs root (namespaces, cgroups), unshare, and x86_64 syscall numbers")


@needs_root_x86
def test_attack_corpus_in_namespaces():
    cgroup = _Cgroup(pids_max=512, memory_bytes=6 << 30)
    try:
        script = (f"{cgroup.enter_command()}; ip link set lo up; "
                  f"exec {sys.executable} {os.path.join(HERE, 'hostile_corpus.py')}")
        proc = subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--net", "sh", "-c", script],
            capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE))
    finally:
        cgroup.remove()
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attacks"] >= 40
    assert report["failures"] == [], json.dumps(report["failures"], indent=1)


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _open_fds(pid):
    """{fd: what it points at}; the host may close unrelated descriptors meanwhile (other tests'
    objects being collected), so leaks are new entries, not a changed count."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def _live_descendants(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.slow
def test_ten_thousand_runs_leak_nothing():
    with Sandbox(workers=2) as sb:
        sb.run("print(0)")
        time.sleep(0.3)
        workers = list(sb.worker_pids)
        fds_before = {w: _fds(w) for w in workers}
        children_before = {w: len(_live_descendants(w)) for w in workers}
        host_fds_before = _open_fds(os.getpid())
        codes = [f"print({i} * 2)" for i in range(10_000)]
        results = sb.run_many(codes)
        bad = [(i, r.status, r.stdout) for i, r in enumerate(results) if r.stdout != f"{i * 2}\n"]
        assert bad == []
        time.sleep(0.5)
        assert sb.worker_pids == workers  # no worker died or was replaced
        assert {w: _fds(w) for w in workers} == fds_before
        assert {w: len(_live_descendants(w)) for w in workers} == children_before
        leaked = set(_open_fds(os.getpid()).items()) - set(host_fds_before.items())
        assert not leaked
        from hostile_corpus import scratch_view
        assert len([d for d in os.listdir(scratch_view(sb)) if d.startswith("w")]) <= 2 * 2  # spares

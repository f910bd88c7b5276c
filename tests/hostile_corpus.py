"""The sandbox's attack corpus: hostile and pathological programs with their expected outcomes.

Run by tests/test_sandbox_hostile.py inside fresh namespaces (unshare --mount --pid --fork
--mount-proc --net) and a cgroup with pids/memory caps. Every attack aims only at things this
runner owns: its scratch folder, its bystander process, its listener on loopback, its secret file
and environment variable. Prints one JSON object: a list of failures (empty when all held).

    python tests/hostile_corpus.py
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from rci_fast.sandbox import Sandbox

SECRET = "rci-corpus-secret-7d1f"


@dataclass
class Attack:
    name: str
    code: str
    statuses: tuple[str, ...]           # acceptable result statuses
    must_not_print: tuple[str, ...] = (SECRET,)
    max_seconds: float = 3.0
    limits: dict | None = None


def _ctypes_syscall(nr: int, *args: int) -> str:
    a = ", ".join(str(x) for x in args)
    return f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint('ret', libc.syscall({nr}, {a}))"


def attacks(outside: str, readable: str, secret_file: str, bystander: int, port: int) -> list[Attack]:
    """`outside`: a folder of the runner's that runs must not touch; `readable`: one that runs may
    read (it is on sys.path) but not write."""
    pwn = os.path.join(outside, "pwned")
    return [
        # resource exhaustion
        Attack("fork bomb", "import os\nwhile True:\n    os.fork()", ("error",)),
        Attack("fork bomb via posix_spawn", "import os\nwhile True:\n    os.posix_spawn('/bin/true', ['true'], {})", ("error",)),
        Attack("thread bomb", "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()",
               ("error", "memory_limit", "timeout"), limits={"timeout_s": 2.0}),
        Attack("memory bomb bytearray", "x = bytearray(1 << 40)", ("memory_limit",)),
        Attack("memory bomb growing list", "x = []\nwhile True:\n    x.append(' ' * (1 << 20))", ("memory_limit",)),
        Attack("memory bomb numpy", "import numpy as np\nx = np.zeros((1 << 38,), dtype=np.uint8)\nx[:] = 1", ("memory_limit",)),
        Attack("memory bomb mmap", "import mmap\nm = mmap.mmap(-1, 1 << 40)", ("memory_limit", "error")),
        Attack("infinite loop", "while True:\n    pass", ("timeout",), limits={"timeout_s": 1.0}),
        Attack("busy threads", "import threading\ndef spin():\n    while True: pass\n"
               "[threading.Thread(target=spin).start() for _ in range(4)]\nspin()", ("timeout",), limits={"timeout_s": 1.0}),
        Attack("sleep forever", "import time\ntime.sleep(10**9)", ("timeout",), limits={"timeout_s": 1.0}),
        Attack("ignore SIGTERM and sleep", "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n"
               "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(10**9)", ("timeout",), limits={"timeout_s": 1.0}),
        Attack("catch SIGXCPU and keep spinning", "import signal\nsignal.signal(signal.SIGXCPU, lambda *a: None)\nwhile True: pass",
               ("timeout",), limits={"timeout_s": 1.0}),
        Attack("infinite output", "while True:\n    print('A' * 1000)", ("output_limit",)),
        Attack("one huge write", "import sys\nsys.stdout.write('B' * (64 << 20))", ("output_limit", "memory_limit")),
        Attack("stderr flood", "import os\nwhile True:\n    os.write(2, b'E' * 65536)", ("output_limit",)),
        Attack("big file", "open('big', 'wb').write(b'0' * (200 << 20))", ("error", "memory_limit")),
        Attack("file count bomb", "i = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1",
               ("error", "timeout"), max_seconds=4.0),
        Attack("disk filler", "while True:\n    import uuid\n    open(uuid.uuid4().hex, 'wb').write(b'0' * (8 << 20))",
               ("error", "timeout", "memory_limit"), max_seconds=4.0),
        Attack("many files open", "fs = [open('f%d' % i, 'w') for i in range(100000)]", ("error",)),
        Attack("deep recursion", "import sys\nsys.setrecursionlimit(10**7)\ndef f(n): return f(n + 1)\nf(0)",
               ("error", "violation", "memory_limit", "timeout"), max_seconds=4.0),
        # processes and exec
        Attack("subprocess", f"import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > {pwn}'])", ("error",)),
        Attack("os.system", f"import os\nprint('rc', os.system('echo pwned > {pwn}'))", ("ok", "error")),
        Attack("multiprocessing", "import multiprocessing as mp\nprint(mp.Pool(2).map(abs, [-1]))", ("error",)),
        Attack("execv", "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned'])", ("violation",)),
        Attack("daemonize", "import os\nos.setsid()\nif os.fork() == 0:\n    import time; time.sleep(100)", ("error",)),
        # signals against things that are not itself
        Attack("kill parent (worker)", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", ("error",)),
        Attack("kill bystander", f"import os\nos.kill({bystander}, 9)", ("error",)),
        Attack("kill process group of parent", "import os\nos.killpg(os.getpgid(os.getppid()), 9)", ("error",)),
        Attack("tgkill other process", f"import ctypes\nprint(ctypes.CDLL(None).syscall(234, {bystander}, {bystander}, 9))\n"
               "import sys; sys.exit(1)", ("error",)),
        Attack("SIGIO to bystander via F_SETOWN", "import fcntl, os, signal\nr, w = os.pipe()\n"
               f"fcntl.fcntl(r, fcntl.F_SETOWN, {bystander})\nfcntl.fcntl(r, 10, signal.SIGKILL)\n"
               "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')", ("error",)),
        Attack("SIGIO with F_SETOWN_EX", "import fcntl, os, struct\nr, w = os.pipe()\n"
               f"fcntl.fcntl(r, 15, struct.pack('ii', 1, {bystander}))", ("error",)),
        Attack("resize a pipe", "import fcntl, os\nr, w = os.pipe()\nfcntl.fcntl(r, 1031, 4096)", ("error",)),
        Attack("kill own process group", "import os\nos.kill(0, 9)", ("violation",)),
        Attack("kill itself", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", ("violation",)),
        Attack("abort", "import os\nos.abort()", ("violation",)),
        Attack("segfault via ctypes", "import ctypes\nctypes.string_at(0)", ("violation",)),
        # dangerous syscalls through ctypes
        Attack("ptrace bystander", _ctypes_syscall(101, 16, bystander, 0, 0), ("violation",)),
        Attack("process_vm_readv bystander", _ctypes_syscall(310, bystander, 0, 0, 0, 0, 0), ("violation",)),
        Attack("mount", _ctypes_syscall(165, 0, 0, 0, 0, 0), ("violation",)),
        Attack("unshare user namespace", _ctypes_syscall(272, 0x10000000), ("violation",)),
        Attack("clone new namespace", _ctypes_syscall(56, 0x10000000 | 17, 0, 0, 0, 0), ("violation",)),
        Attack("setuid", _ctypes_syscall(105, 0), ("violation",)),
        Attack("chroot", _ctypes_syscall(161, 0), ("violation",)),
        Attack("bpf", _ctypes_syscall(321, 0, 0, 0), ("violation",)),
        Attack("io_uring", _ctypes_syscall(425, 1, 0), ("violation",)),
        Attack("keyctl", _ctypes_syscall(250, 0, 0, 0, 0), ("violation",)),
        Attack("raise own limits", "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))", ("error",)),
        Attack("new seccomp filter or landlock", _ctypes_syscall(317, 0, 0, 0) + "\nimport sys\nsys.exit(0)", ("ok",)),
        # network
        Attack("tcp connect to loopback listener", f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'pwned')", ("error",)),
        Attack("udp send", f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))", ("error",)),
        Attack("dns lookup", "import socket\nprint(socket.getaddrinfo('example.com', 80))", ("error",)),
        Attack("raw socket syscall", _ctypes_syscall(41, 2, 1, 0) + "\nimport sys\nsys.exit(1)", ("error",)),
        Attack("unix socketpair", "import socket\nsocket.socketpair()", ("error",)),
        # files outside the scratch folder
        Attack("write outside scratch", f"open('{pwn}', 'w').write('pwned')", ("error",)),
        Attack("symlink escape", f"import os\nos.symlink('{outside}', 'link')\nopen('link/pwned', 'w').write('x')", ("error",)),
        Attack("hard link the secret in", f"import os\nos.link('{secret_file}', 'copy')\nprint(open('copy').read())", ("error",)),
        Attack("rename outside", f"import os\nopen('x', 'w').write('pwned')\nos.rename('x', '{pwn}')", ("error",)),
        Attack("set-uid file by chmod", "import os\nopen('f', 'w').close()\nos.chmod('f', 0o4755)", ("error",)),
        Attack("set-gid file by open", "import os\nos.open('g', os.O_CREAT | os.O_WRONLY, 0o2755)", ("error",)),
        Attack("read secret file", f"print(open('{secret_file}').read())", ("error",)),
        Attack("list the root folder", "import os\nprint(os.listdir('/'))", ("error",)),
        Attack("read parent environment", "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", ("error",)),
        Attack("snoop bystander via /proc", f"print(open('/proc/{bystander}/environ').read(), open('/proc/{bystander}/cmdline').read())", ("error",)),
        Attack("list /proc", "import os\nprint(os.listdir('/proc'))", ("error",)),
        Attack("print environment", "import os\nprint(dict(os.environ))", ("ok",)),
        Attack("chdir up and write", "import os\nos.chdir('..')\nopen('pwned', 'w').write('x')", ("error",)),
        Attack("write into a readable folder", f"print(open('{readable}/data.txt').read())\nopen('{readable}/pwned', 'w')", ("error",),
               must_not_print=(SECRET,)),
        # descriptors and misc
        Attack("inherited descriptors", "import os\nfds = []\nfor fd in range(1024):\n    try:\n        os.fstat(fd)\n        fds.append(fd)\n"
               "    except OSError:\n        pass\nassert fds == [0, 1, 2, 3, 4], fds", ("ok",)),
        Attack("/dev/fd listing", "import os\nprint(sorted(os.listdir('/dev/fd')))", ("error",)),
        Attack("thread printing after the end", "import threading, time\n"
               "threading.Thread(target=lambda: [print('late') or time.sleep(0.01) for _ in range(1000)], daemon=True).start()",
               ("ok",), max_seconds=1.0),
        Attack("close report pipe and spin", "import os\nos.close(4)\nwhile True: pass", ("timeout",), limits={"timeout_s": 1.0}),
        Attack("forge a report", "import os\nos.write(4, b'garbage' * 10)\nprint('after')", ("violation",)),
        Attack("close every descriptor", "import os\nos.closerange(0, 1024)\nwhile True: pass", ("timeout", "error", "ok"), limits={"timeout_s": 1.0}),
    ]


def scratch_view(sb) -> str:
    """The scratch root as the sandbox sees it (a private tmpfs lives in its mount namespace)."""
    inside = f"/proc/{sb.template_pid}/root{sb.scratch_root}"
    return inside if os.path.isdir(inside) else sb.scratch_root


def _bystander() -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "RCI_BYSTANDER_SECRET": SECRET}
    return subprocess.Popen(["sleep", "1000"], env=env)


def _listener() -> tuple[socket.socket, list]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    received: list = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                received.append(conn.recv(100))
                conn.close()
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    return srv, received, stop


def _descendants(root: int) -> set[int]:
    """Processes below `root` (zombies included), from the parent links in /proc."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                pass
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    failures = []
    outside = tempfile.mkdtemp(prefix="rci-corpus-")
    secret_file = os.path.join(outside, "secret.txt")
    with open(secret_file, "w") as f:
        f.write(SECRET)
    os.environ["RCI_HOST_SECRET"] = SECRET  # must not reach any run
    readable = tempfile.mkdtemp(prefix="rci-corpus-readable-")
    os.chmod(readable, 0o755)
    with open(os.path.join(readable, "data.txt"), "w") as f:
        f.write("public data")
    sys.path.append(readable)  # the sandbox grants reads below sys.path entries
    bystander = _bystander()
    srv, received, stop_listener = _listener()
    port = srv.getsockname()[1]
    # The listener must be reachable from outside the sandbox, or the network attacks prove nothing.
    socket.create_connection(("127.0.0.1", port), timeout=1).sendall(b"probe")
    time.sleep(0.3)
    assert received == [b"probe"], received
    received.clear()

    corpus = attacks(outside, readable, secret_file, bystander.pid, port)
    with Sandbox(workers=2, timeout_s=3.0, memory_mb=512, max_output_bytes=64 * 1024,
                 max_file_mb=16, max_open_files=64) as sb:
        workers = list(sb.worker_pids)
        sb.run("print(1)")
        time.sleep(0.3)
        procs_before = len(_descendants(sb.template_pid))
        fds_before = {pid: _fd_count(pid) for pid in workers}
        for attack in corpus:
            t0 = time.monotonic()
            r = sb.run(attack.code, **(attack.limits or {}))
            took = time.monotonic() - t0
            print(f"{attack.name:<40}{r.status:<14}{took:6.2f} s", file=sys.stderr)
            problems = []
            if r.status not in attack.statuses:
                problems.append(f"status {r.status!r}, expected one of {attack.statuses}")
            if took > attack.max_seconds:
                problems.append(f"took {took:.2f} s")
            for bad in attack.must_not_print:
                if bad in r.stdout or bad in r.stderr:
                    problems.append(f"leaked {bad!r}")
            for folder in (outside, readable):
                if os.path.exists(os.path.join(folder, "pwned")):
                    problems.append(f"wrote into {folder}")
                    os.unlink(os.path.join(folder, "pwned"))
            if bystander.poll() is not None:
                problems.append("bystander process died")
                bystander = _bystander()
            if sb.worker_pids != workers:
                problems.append("a worker died")
                workers = list(sb.worker_pids)
            if problems:
                failures.append({"attack": attack.name, "problems": problems, "status": r.status,
                                 "stdout": r.stdout[-300:], "stderr": r.stderr[-600:]})
        # Afterwards the sandbox still works, and nothing was left behind.
        ok = sb.run("print('still fine')")
        if ok.stdout != "still fine\n":
            failures.append({"attack": "aftermath", "problems": ["sandbox broken"], "stdout": ok.stdout})
        time.sleep(0.5)
        procs_after = len(_descendants(sb.template_pid))
        if procs_after > procs_before:
            failures.append({"attack": "aftermath", "problems": [f"{procs_after - procs_before} processes left behind"]})
        for pid, before in fds_before.items():
            if pid in sb.worker_pids and _fd_count(pid) > before:
                failures.append({"attack": "aftermath", "problems": [f"worker {pid} leaked descriptors"]})
        scratch_left = [d for d in os.listdir(scratch_view(sb)) if d.startswith("w")]
        if len(scratch_left) > 2 * len(workers) + 2:  # the spares' folders only
            failures.append({"attack": "aftermath", "problems": [f"scratch folders left: {scratch_left}"]})
    if received:
        failures.append({"attack": "network", "problems": [f"listener received {received}"]})
    stop_listener.set()
    srv.close()
    bystander.send_signal(signal.SIGKILL)
    bystander.wait()
    shutil.rmtree(outside, ignore_errors=True)
    shutil.rmtree(readable, ignore_errors=True)
    print(json.dumps({"attacks": len(corpus), "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

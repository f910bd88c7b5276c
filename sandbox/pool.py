"""Host side of the sandbox: starts the template process, talks to its workers, returns results.

Never imports torch and never forks the (possibly multi-threaded) host process: the template is
started with subprocess (fork+exec), and every later fork happens in the single-threaded template
or its workers.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field

from rci_fast.sandbox import _core

STATUSES = ("ok", "error", "timeout", "memory_limit", "output_limit", "violation")

DEFAULT_PRELOAD = (
    "math", "cmath", "fractions", "decimal", "statistics", "random", "itertools", "functools",
    "collections", "heapq", "bisect", "re", "string", "json", "datetime", "time", "copy",
    "operator", "typing", "dataclasses", "enum", "array", "hashlib", "textwrap", "pprint",
    "tempfile", "numpy", "numpy.random", "numpy.linalg", "numpy.fft", "sympy",
)

# Wire format, mirrored from csrc/protocol.h (sizes are checked against the extension at import).
_REQUEST = struct.Struct("<IIIIdQQQII")
_RESPONSE = struct.Struct("<IiiiIIddQII")
_REQUEST_MAGIC, _RESPONSE_MAGIC = 0x51494352, 0x52494352
_OP_RUN, _OP_SESSION_OPEN, _OP_SESSION_RUN, _OP_SESSION_CLOSE = 1, 2, 3, 4
_RF_STDOUT_TRUNCATED, _RF_STDERR_TRUNCATED, _RF_SESSION_ENDED = 1, 2, 4
assert _REQUEST.size == _core.REQUEST_HEADER_SIZE and _RESPONSE.size == _core.RESPONSE_HEADER_SIZE

# Runs get a uid per worker (csrc/zygote.h says why and where the range lies): RLIMIT_NPROC
# (max_threads) counts the processes of a uid machine-wide, so a shared uid (nobody) gave every
# run, every other sandbox's runs and spares, and the uid's other processes one thread budget.
WORKER_UID_BASE, WORKER_UID_SPAN, _UID_MIX = 0x78000000, 0x7FFE0000 - 0x78000000, 0x9E3779B1


def worker_uid(pid: int) -> int:
    """The uid of the runs of worker `pid` (in this pid namespace), as the worker computes it."""
    return WORKER_UID_BASE + (pid + os.stat("/proc/self/ns/pid").st_ino * _UID_MIX) % WORKER_UID_SPAN
_HOST_GRACE_S = 5.0  # a worker that answers this long after a run's timeout is declared hung


class SandboxError(RuntimeError):
    """The sandbox itself could not start or was misused (never raised for what code does)."""


@dataclass
class RunResult:
    status: str            # one of STATUSES
    stdout: str
    stderr: str
    exit_code: int         # exit status of the code (0 when killed by a signal)
    wall_ms: float         # from handing over the code to its end, measured by the worker
    cpu_ms: float = 0.0
    max_rss_kb: int = 0
    signal: int = 0        # the signal that ended the run, if any
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024          # address space beyond what the warm interpreter already maps
    max_output_bytes: int = 256 * 1024   # per stream; beyond it the run ends with "output_limit"
    max_file_mb: int = 64          # largest file the code may write
    max_open_files: int = 64
    max_threads: int = 64          # enforced when runs drop to their own uid

    def with_timeout(self, timeout_s: float | None) -> "Limits":
        return self if timeout_s is None else Limits(**{**self.__dict__, "timeout_s": timeout_s})

    def pack(self, op: int, session_id: int, code: bytes) -> bytes:
        if not self.timeout_s > 0 or self.memory_mb <= 0 or self.max_output_bytes <= 0:
            raise ValueError(f"invalid sandbox limits: {self}")
        return _REQUEST.pack(_REQUEST_MAGIC, op, session_id, len(code), float(self.timeout_s),
                             int(self.memory_mb) << 20, int(self.max_output_bytes),
                             int(self.max_file_mb) << 20, int(self.max_open_files),
                             int(self.max_threads)) + code


class _WorkerGone(Exception):
    pass


@dataclass(eq=False)
class _Worker:
    sock: socket.socket
    pid: int
    busy: bool = False
    released_at: float = 0.0   # time.monotonic() when its last call ended
    generation: int = 0
    sessions: set = field(default_factory=set)

    def call(self, request: bytes, wait_s: float) -> tuple[tuple, bytes, bytes]:
        try:
            self.sock.settimeout(wait_s)
            self.sock.sendall(request)
            header = _recv_exactly(self.sock, _RESPONSE.size)
            fields = _RESPONSE.unpack(header)
            if fields[0] != _RESPONSE_MAGIC:
                raise _WorkerGone("corrupt response")
            body = _recv_exactly(self.sock, fields[9] + fields[10])
        except (OSError, EOFError) as e:  # socket.timeout is an OSError
            raise _WorkerGone(str(e) or type(e).__name__) from e
        return fields, body[:fields[9]], body[fields[9]:]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("worker closed the connection")
        got += k
    return bytes(buf)


def _readable_by_others(path: str) -> bool:
    """True when every folder above `path` can be entered by any uid."""
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _python_read_paths() -> list[str]:
    """Folders a run may read: the interpreter, its libraries and the import path; no home, /tmp
    or /proc. The current folder and the folder Python started from are left out on purpose
    (sys.path[0]: '' in a shell, but the absolute current folder under `python -m` and the
    script's folder for a script): a run must not read the project, its runs or its data."""
    started_from = {os.path.realpath(os.getcwd())}
    if sys.path and sys.path[0]:
        started_from.add(os.path.realpath(sys.path[0]))
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in sys.path if p and os.path.isabs(p) and os.path.realpath(p) not in started_from)
    paths.update(["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo",
                  "/etc/localtime", "/dev/urandom", "/dev/zero"])
    resolved = set()
    for p in paths:
        if os.path.exists(p):
            resolved.add(p)
            resolved.add(os.path.realpath(p))
    return sorted(p for p in resolved if p not in ("/", "/tmp", "/proc", os.path.expanduser("~")))


# After a run a worker spends a few milliseconds forking its next spare and reaping the last
# child. A call that comes sooner goes to another worker (that work then overlaps it); later
# calls go to the most recently used worker, which keeps the other workers and their caches cold
# and out of the way.
_SETTLE_S = 0.004


def _preference(now: float):
    def key(w: _Worker):
        settled = now - w.released_at >= _SETTLE_S
        return (len(w.sessions), not settled, -w.released_at if settled else w.released_at)
    return key


class Session:
    """One run child kept alive across calls: variables and files persist, like a notebook cell
    sequence. Calls of one session run one at a time on the worker that holds it."""

    def __init__(self, sandbox: "Sandbox", worker: _Worker, session_id: int, limits: Limits):
        self._sandbox, self._worker, self.id, self._limits = sandbox, worker, session_id, limits
        self._generation = worker.generation
        self.closed = session_id == 0

    def run(self, code: str | bytes, timeout_s: float | None = None) -> RunResult:
        if self.closed or self._worker.generation != self._generation:
            self.closed = True
            return _error_result("session ended (an earlier call timed out, crashed or it was closed)")
        result, flags, _ = self._sandbox._call(self._worker, _OP_SESSION_RUN, self.id, code,
                                               self._limits.with_timeout(timeout_s))
        if flags & _RF_SESSION_ENDED:
            self.closed = True
        return result

    def close(self) -> None:
        if not self.closed and self._worker.generation == self._generation:
            self._sandbox._call(self._worker, _OP_SESSION_CLOSE, self.id, b"", self._limits)
        self.closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_result(message: str) -> RunResult:
    return RunResult("error", "", f"rci_fast sandbox: {message}\n", 1, 0.0)


class Sandbox:
    """Runs untrusted Python fast: warm pre-forked workers, seccomp, Landlock, rlimits.

        with Sandbox(workers=2) as sb:
            r = sb.run("print(1)", timeout_s=5.0)
            rs = sb.run_many([code_a, code_b])
            fut = sb.submit(code)
    """

    def __init__(self, workers: int | None = None, *, timeout_s: float = 10.0,
                 memory_mb: int = 1024, max_output_bytes: int = 256 * 1024, max_file_mb: int = 64,
                 max_open_files: int = 64, max_threads: int = 64,
                 preload: tuple[str, ...] | list[str] = DEFAULT_PRELOAD,
                 run_uid: int | str | None = None, scratch_dir: str | None = None,
                 max_sessions_per_worker: int = 256, int_max_str_digits: int = 0,
                 scratch_mb: int = 1024, scratch_files: int = 65536,
                 startup_timeout_s: float = 120.0, seed: int | None = None):
        if sys.platform != "linux":
            raise SandboxError("the rci_fast sandbox needs Linux (seccomp, Landlock)")
        self.workers = workers or len(os.sched_getaffinity(0))
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        self.limits = Limits(timeout_s, memory_mb, max_output_bytes, max_file_mb, max_open_files,
                             max_threads)
        self.limits.pack(_OP_RUN, 0, b"")  # validates the limits now, not at the first run
        self._preload = list(preload)
        self._scratch_parent = scratch_dir
        self._max_sessions = max_sessions_per_worker
        self._int_max_str_digits = int_max_str_digits
        self._startup_timeout_s = startup_timeout_s
        if not (run_uid is None or run_uid == "per_worker"
                or (isinstance(run_uid, int) and not isinstance(run_uid, bool) and run_uid >= 0)):
            raise ValueError(f"run_uid must be None, 'per_worker' or a uid >= 0, got {run_uid!r}")
        self._run_uid = run_uid
        if seed is not None and not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self._seed = seed
        # Root only: all scratch folders on one private tmpfs of this size and file count, so
        # runs cannot fill the disk or its inodes (0 = plain folders under scratch_dir).
        self._scratch_mb, self._scratch_files = scratch_mb, scratch_files
        self._cond = threading.Condition()
        self._control_lock = threading.Lock()  # one worker request at a time on the template socket
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._workers: list[_Worker] = []
        self._template: subprocess.Popen | None = None
        self._closed = False
        self._start()
        self._finalizer = weakref.finalize(self, Sandbox._shutdown, self._template, self._control,
                                           list(self._workers), self.scratch_root)
        self._self_test()

    # ---- start and stop --------------------------------------------------------------------

    def _start(self) -> None:
        self.scratch_root = tempfile.mkdtemp(prefix="rci-sandbox-", dir=self._scratch_parent)
        os.chmod(self.scratch_root, 0o711)
        uid, per_worker = -1, False
        if os.geteuid() == 0:
            if isinstance(self._run_uid, int):
                uid = self._run_uid
            # Another uid must be able to read the interpreter (e.g. not under a 0700 /root).
            elif self._run_uid == "per_worker" or all(map(_readable_by_others, [sys.prefix, sys.base_prefix])):
                per_worker = True
        self.isolation = {
            "seccomp_filter_instructions": _core.seccomp_filter_length(),
            "landlock_abi": _core.landlock_abi(),
            "run_uid": "one per worker (sandbox.pool.worker_uid)" if per_worker
                       else uid if uid >= 0 else os.geteuid(),
            "capabilities": "none",
        }
        if self.isolation["landlock_abi"] == 0:
            warnings.warn("rci_fast sandbox: this kernel has no Landlock (Linux before 5.13, or turned off): runs "
                          "are held by seccomp, rlimits and their uid only, and may read and write whatever that "
                          "uid may", RuntimeWarning, stacklevel=3)
        config = {
            "sys_path": [p for p in sys.path if p],
            "preload": self._preload,
            "scratch_root": self.scratch_root,
            "read_paths": _python_read_paths(),
            "rw_files": ["/dev/null"],
            "run_uid": uid,
            "run_gid": uid,
            "uid_per_worker": per_worker,
            "max_sessions": self._max_sessions,
            "int_max_str_digits": self._int_max_str_digits,
            "scratch_mb": self._scratch_mb,
            "scratch_files": self._scratch_files,
            "seed": self._seed,
        }
        host_end, template_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config["control_fd"] = template_end.fileno()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": self.scratch_root, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        if self._seed is not None:  # str hashes (set and dict-of-set orders) from the seed too
            env["PYTHONHASHSEED"] = str(self._seed)
        boot = ("import sys, json; c = json.loads(sys.argv[1]); sys.path[:] = c['sys_path']; "
                "from rci_fast.sandbox._zygote import main; main(c)")
        log_path = os.path.join(self.scratch_root, "template.log")
        with open(log_path, "wb") as log:
            self._template = subprocess.Popen(
                # -s, not -I: -I would ignore PYTHONHASHSEED; the environment is ours anyway
                # and the boot code replaces sys.path.
                [sys.executable, "-s", "-c", boot, json.dumps(config)], env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[template_end.fileno()],
                start_new_session=True, cwd=self.scratch_root)
        template_end.close()
        self._control = host_end
        self._control.settimeout(self._startup_timeout_s)
        try:
            ready = self._control.recv(2)
            if len(ready) == 1:
                ready += self._control.recv(1)
        except OSError:
            ready = b""
        if ready[:1] != b"R":
            self._template.kill()
            self._template.wait()
            with open(log_path, errors="replace") as f:
                log_text = f.read()[-4000:]
            shutil.rmtree(self.scratch_root, ignore_errors=True)
            raise SandboxError(f"sandbox template failed to start:\n{log_text}")
        self.isolation["scratch"] = (f"private tmpfs, {self._scratch_mb} MiB, {self._scratch_files} files"
                                     if ready == b"RT" else "folder on disk")
        self._workers = [self._spawn_worker() for _ in range(self.workers)]

    def _self_test(self) -> None:
        """One trivial run before the sandbox is handed out: a machine whose kernel refuses the
        lockdown (seccomp, Landlock, uid change) fails here, with the reason, not at every run."""
        result = self.run("pass", timeout_s=max(self.limits.timeout_s, 10.0))
        if result.status != "ok":
            self.close()
            hint = ""
            if "chown" in result.stderr:
                hint = ("\n(the runs' folders live under scratch_dir, default the system temp folder; as root "
                        "they are given to an unprivileged uid: pass a scratch_dir on a file system that "
                        "allows chown, or run_uid=os.geteuid() to keep root's uid inside the sandbox)")
            raise SandboxError(f"the sandbox cannot run code on this machine ({result.status}):\n"
                               f"{result.stderr.strip()}{hint}")

    def _spawn_worker(self) -> _Worker:
        with self._control_lock:
            try:
                self._control.settimeout(30.0)
                self._control.sendall(b"W")
                msg, fds, _, _ = socket.recv_fds(self._control, 4, 1)
            except OSError as e:
                raise SandboxError(f"the sandbox template is gone ({e}); create a new Sandbox") from e
        if len(msg) != 4 or not fds:
            raise SandboxError("sandbox template could not start a worker")
        (pid,) = struct.unpack("<i", msg)
        return _Worker(socket.socket(fileno=fds[0]), pid)

    @staticmethod
    def _shutdown(template, control, workers, scratch_root) -> None:
        for w in workers:
            w.sock.close()  # EOF: the worker kills its children and exits
        if control is not None:
            control.close()  # EOF: the template kills its workers and exits
        if template is not None:
            try:
                template.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(template.pid, 9)
                template.wait()
        shutil.rmtree(scratch_root, ignore_errors=True)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._finalizer.detach()
        Sandbox._shutdown(self._template, self._control, self._workers, self.scratch_root)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    @property
    def template_pid(self) -> int:
        return self._template.pid

    # ---- running code --------------------------------------------------------------------

    def _acquire(self, worker: _Worker | None = None) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxError("sandbox is closed")
                if worker is None:
                    free = [w for w in self._workers if not w.busy]
                    if free:
                        chosen = min(free, key=_preference(time.monotonic()))
                        break
                elif not worker.busy:
                    chosen = worker
                    break
                self._cond.wait()
            chosen.busy = True
            return chosen

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            worker.busy, worker.released_at = False, time.monotonic()
            self._cond.notify_all()

    def _replace(self, worker: _Worker) -> None:
        """A worker died or hung: kill it and start a fresh one in its place."""
        try:
            os.kill(worker.pid, 9)
        except ProcessLookupError:
            pass
        worker.sock.close()
        fresh = self._spawn_worker()
        worker.sock, worker.pid = fresh.sock, fresh.pid
        worker.generation += 1
        worker.sessions.clear()

    def _call(self, worker: _Worker | None, op: int, session_id: int, code: str | bytes,
              limits: Limits) -> tuple[RunResult, int, int]:
        """One request to one worker (any free one when `worker` is None).
        Returns the result, the response flags and the session id."""
        if isinstance(code, str):
            code = code.encode("utf-8", errors="surrogateescape")
        request = limits.pack(op, session_id, code)
        w = self._acquire(worker)
        try:
            if worker is not None and op != _OP_SESSION_OPEN and session_id not in w.sessions:
                return _error_result("session ended"), _RF_SESSION_ENDED, 0
            wait_s = limits.timeout_s + _HOST_GRACE_S
            try:
                fields, out, err = w.call(request, wait_s)
            except _WorkerGone as e:
                self._replace(w)
                return _error_result(f"worker died or hung ({e}); it was restarted"), _RF_SESSION_ENDED, 0
            (_, status, exit_code, sig, sid, flags, wall_ms, cpu_ms, rss, _, _) = fields
            if op == _OP_SESSION_OPEN and sid:
                w.sessions.add(sid)
            if flags & _RF_SESSION_ENDED:
                w.sessions.discard(sid)
        finally:
            self._release(w)
        result = RunResult(STATUSES[status], out.decode("utf-8", errors="replace"),
                           err.decode("utf-8", errors="replace"), exit_code, wall_ms, cpu_ms, rss,
                           sig, bool(flags & _RF_STDOUT_TRUNCATED), bool(flags & _RF_STDERR_TRUNCATED))
        return result, flags, sid

    def run(self, code: str | bytes, timeout_s: float | None = None, **limits) -> RunResult:
        """Runs code in a fresh child of a warm worker; blocks (without the GIL) until it ends."""
        return self._call(None, _OP_RUN, 0, code, self._limits_for(timeout_s, limits))[0]

    def submit(self, code: str | bytes, timeout_s: float | None = None,
               **limits) -> concurrent.futures.Future:
        """Non-blocking run; the Future resolves to a RunResult."""
        with self._cond:
            if self._closed:
                raise SandboxError("sandbox is closed")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(self.workers, 1) * 2, thread_name_prefix="rci-sandbox")
        return self._executor.submit(self.run, code, timeout_s, **limits)

    def run_many(self, codes, timeout_s: float | None = None, **limits) -> list[RunResult]:
        """Runs all codes concurrently across the workers; results come back in order."""
        futures = [self.submit(c, timeout_s, **limits) for c in codes]
        return [f.result() for f in futures]

    def session(self, timeout_s: float | None = None, cpu_budget_s: float = 120.0,
                **limits) -> Session:
        """Opens a session: one child that keeps its variables across `run` calls.
        `cpu_budget_s` bounds the CPU time of all its calls together; each call has its own
        wall-clock timeout."""
        call_limits = self._limits_for(timeout_s, limits)
        open_limits = Limits(**{**call_limits.__dict__, "timeout_s": cpu_budget_s})
        w = None
        with self._cond:
            free = [x for x in self._workers if not x.busy] or self._workers
            w = min(free, key=lambda x: len(x.sessions))
        result, _, sid = self._call(w, _OP_SESSION_OPEN, 0, b"", open_limits)
        if not sid:
            raise SandboxError(f"could not open a sandbox session: {result.stderr.strip()}")
        return Session(self, w, sid, call_limits)

    def _limits_for(self, timeout_s: float | None, overrides: dict) -> Limits:
        unknown = set(overrides) - set(Limits.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sandbox limit(s): {', '.join(sorted(unknown))}")
        values = {**self.limits.__dict__, **overrides}
        if timeout_s is not None:
            values["timeout_s"] = timeout_s
        return Limits(**values)

"""The sandbox's template process and what runs inside each run child.

Started by `Sandbox` as `python -s -c ...` with a scrubbed environment. It imports the warm modules
once, freezes the garbage collector (so forked children do not copy pages by touching objects) and
hands control to the C++ fork server. `serve_template` returns only inside a locked-down run child,
where `run_child` executes the model's code.
"""
import gc
import importlib
import io
import linecache
import os
import sys
import tempfile
import traceback

from rci_fast.sandbox import _core

_CODE_NAME = "<code>"
# Run once in each spare child before its code arrives, so the first writes to the interpreter's
# shared pages (reference counts, caches) are paid off the request path.
_WARM_UP_CODE = b"x = [str(i) for i in range(64)]\nprint(*x, sep=',', end='', file=open('/dev/null', 'w'))\n"


def _warm_up(modules):
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional module that is not installed is not warmed
    if "sympy" in sys.modules:  # sympy imports much lazily: pay for it once, here
        import sympy

        x = sympy.Symbol("x")
        sympy.solve(x**2 - 1, x)
        sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
        sympy.factorint(360)
        sympy.integrate(x**2, x)
        sympy.Rational(1, 3) + sympy.sqrt(2)
    if "numpy" in sys.modules:
        import numpy as np

        np.linalg.solve(np.eye(2), np.ones(2))
        np.sort(np.arange(10)[::-1])


def _exec(code: bytes, namespace: dict):
    """Runs code like `python -c`. Returns (exit_code, memory_error)."""
    try:
        text = code.decode("utf-8", errors="replace")
        linecache.cache[_CODE_NAME] = (len(text), None, text.splitlines(True), _CODE_NAME)
        exec(compile(code, _CODE_NAME, "exec"), namespace)
        return 0, False
    except SystemExit as e:
        if e.code is None:
            return 0, False
        if isinstance(e.code, int):
            return e.code & 0xFF, False
        print(e.code, file=sys.stderr)
        return 1, False
    except MemoryError:
        os.write(2, b"MemoryError: the run exceeded its memory limit\n")
        return 1, True
    except BaseException as e:  # noqa: BLE001 - report it the way python would
        tb = e.__traceback__.tb_next if e.__traceback__ else None  # hide this frame
        try:
            sys.stderr.write("".join(traceback.format_exception(type(e), e, tb)))
        except MemoryError:
            os.write(2, b"MemoryError\n")
            return 1, True
        return 1, False


def _fresh_namespace():
    return {"__name__": "__main__", "__builtins__": __builtins__, "__doc__": None}


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the code may have closed or replaced it
            pass


def run_child(seed: int | None):
    """Runs in a spare child: prepare (before the code arrives, off the request path), wait for
    the code, which locks the process down, then run it."""
    here = os.getcwd()
    os.environ["HOME"] = os.environ["TMPDIR"] = here
    tempfile.tempdir = here
    sys.argv = [""]
    sys.path.insert(0, "")  # as `python -c`: modules the code writes into its folder import
    # Text streams over the pipes; unencodable text is escaped rather than raising.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    # A fork copies the random generators' state: give each run its own, or, with a seed, the
    # same one (a run's output then depends on its code alone: repeatable rollouts).
    if "random" in sys.modules:
        sys.modules["random"].seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(int.from_bytes(os.urandom(4), "little") if seed is None else seed)
    namespace = _fresh_namespace()
    _exec(_WARM_UP_CODE, {"__builtins__": __builtins__})  # touch (copy) the pages a run writes
    first = _core.child_start()
    if first is None:
        os._exit(0)
    code, session = first
    while True:
        exit_code, memory_error = _exec(code, namespace)
        _flush()
        _core.child_report(exit_code, memory_error)
        if not session:
            os._exit(exit_code)
        code = _core.child_next()
        if code is None:
            os._exit(0)


def main(config: dict):
    sys.set_int_max_str_digits(config["int_max_str_digits"])
    control_fd = config["control_fd"]
    _warm_up(config["preload"])
    gc.collect()
    gc.freeze()
    tmpfs = bool(config["scratch_mb"]) and os.geteuid() == 0 and _core.mount_private_tmpfs(
        config["scratch_root"], config["scratch_mb"] << 20, config["scratch_files"])
    os.write(control_fd, b"RT" if tmpfs else b"RD")  # ready (T: scratch on a private tmpfs)
    _core.serve_template(control_fd, config["scratch_root"], config["read_paths"],
                         config["rw_files"], config["run_uid"], config["run_gid"],
                         config["uid_per_worker"], config["max_sessions"])
    try:
        run_child(config["seed"])
    except BaseException:  # noqa: BLE001 - never fall back into the template's code
        traceback.print_exc()
    os._exit(1)

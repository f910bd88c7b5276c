"""rci_fast's C++ CPU kernels for the model, built on first use.

cpu_kernels.cpp holds the rollout engine's decode step for float32 models (cpu_decode.py; its
GEMMs are small_gemm.cpp's) and fused RMSNorm, SwiGLU, RoPE and packed causal attention, forward
and backward, for training (cpu_ops.py); rollout/sampling.cpp the engine's sampler on a CPU.

torch.utils.cpp_extension compiles them once (~30 s with 2 cores) into a folder per Python and
torch version under ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR to move it); later processes
load the cached build. It needs a C++ compiler and ninja (pip installs ninja with rci_fast's
[train] extra). Where the build fails, `available()` is False, a warning says why, and the model
and engine keep to their Python paths.

Builds are serialized by an advisory lock (flock) beside the build folder, which the kernel
releases when its holder dies. torch's own lock is a plain file that a build killed midway leaves
behind (the next process would wait on it forever); whoever holds the flock knows no one else is
building, so it removes such a leftover.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import warnings

_HERE = os.path.dirname(__file__)
SOURCES = [os.path.join(_HERE, "cpu_kernels.cpp"), os.path.join(_HERE, "small_gemm.cpp"),
           os.path.join(_HERE, "..", "rollout", "sampling.cpp")]
log = logging.getLogger("rci_fast.native")
_lock = threading.Lock()
_state: dict[str, str | bool] = {}  # "loaded": True, or "error": why the build failed


def available() -> bool:
    """Builds (first time on this machine) and loads the extension, once per process."""
    if _state:  # settled: the model asks this at every RMSNorm and SwiGLU, no lock needed then
        return bool(_state.get("loaded"))
    with _lock:
        if not _state:
            try:
                _load()
                _state["loaded"] = True
            except Exception as e:  # no compiler, no ninja, a failed build: the Python paths still work
                _state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"rci_fast's C++ CPU kernels could not be built; the model and the rollout "
                              f"engine use their slower Python paths on a CPU ({_state['error'][:500]})")
    return bool(_state.get("loaded"))


def error() -> str | None:
    """Why the build failed (None if it did not, or was not tried)."""
    return _state.get("error")  # type: ignore[return-value]


def build_directory() -> str:
    """Where the extension is built and cached: one folder per Python and torch version."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}"
           f"_torch{torch.__version__.replace('+', '_')}")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch reads it
    return os.path.join(root, f"rci_fast_cpu_{tag}")


def _load() -> None:
    from torch.utils.cpp_extension import load
    # torch looks for ninja on PATH; pip puts it beside this interpreter, which may not be on PATH.
    here, path = os.path.dirname(sys.executable), os.environ.get("PATH", "")
    if here not in path.split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + path
    folder = build_directory()
    os.makedirs(folder, exist_ok=True)
    with open(folder + ".lock", "w") as lock_file:
        locked = True
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that builds rci_fast's C++ CPU kernels in %s", folder)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock (some NFS or Lustre mounts): torch's lock only
            log.info("no flock on %s (%s); a build killed midway would leave a lock to delete by hand", folder, e)
            locked = False
        stale = os.path.join(folder, "lock")  # torch's FileBaton; with the flock held nobody else builds
        if locked and os.path.exists(stale):
            log.warning("removing %s, left by a build that was interrupted", stale)
            os.remove(stale)
        log.info("loading rci_fast's C++ CPU kernels (built once per machine, ~30 s the first time)")
        # -fopenmp: at::parallel_for is inline code with an OpenMP pragma (torch's own libgomp
        # serves it at run time: same soname, already loaded). -ffp-contract=off: a * b + c stays
        # two roundings wherever the target has FMA (aarch64; x86 clones here have none), so a
        # kernel's bits do not depend on where the compiler chose to fuse (explicit FMAs stay).
        load("rci_fast_cpu", SOURCES, extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi"],
             extra_ldflags=["-fopenmp"],
             build_directory=folder, is_python_module=False)

"""rci_fast.sandbox: run untrusted Python fast and safely (warm fork server, seccomp, Landlock).

    from rci_fast.sandbox import Sandbox
    with Sandbox(workers=2) as sb:
        r = sb.run("print(1)", timeout_s=5.0)
        r.status, r.stdout, r.stderr, r.exit_code, r.wall_ms

Usable on its own: imports neither torch nor anything else of rci_fast.
"""
from rci_fast.sandbox.pool import (DEFAULT_PRELOAD, STATUSES, Limits, RunResult, Sandbox,
                                   SandboxError, Session)

__all__ = ["Sandbox", "Session", "RunResult", "Limits", "SandboxError", "STATUSES", "DEFAULT_PRELOAD"]

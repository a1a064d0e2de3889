"""BoTorch's fused multi-objective kernel, which must never block a study."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..processes import die_with_parent
from . import seam

FUSED_KERNEL_BUILD_TIMEOUT_S = 300


def bounded_fused_kernel() -> str | None:
    """BoTorch's multi-objective acquisition (qLogNEHVI) compiles a fused C++ kernel on first use with
    torch's JIT extension loader, which waits forever on the ``lock`` file a killed compile leaves
    behind. Never let it wait: a lock present means the pure-Python path (the same numbers, slower);
    a first build runs in a child process with a time limit. Returns a note for the user, or None."""
    logei = seam.fused_kernel()
    if seam.kernel_tried(logei):
        return None
    build = Path(seam.kernel_build_directory("logei_fused_ext"))
    lock = build / "lock"
    if lock.exists():
        seam.give_up_kernel(logei)
        return (f"BoTorch's fused multi-objective kernel is locked by {lock} (left by an interrupted build?); using "
                "the slower pure-Python version. Delete that file if no other process is building the kernel.")
    if not (build / "logei_fused_ext.so").exists():
        code = ("import sys, botorch.acquisition.multi_objective.logei as m; m._try_load_fused_kernel(); "
                "sys.exit(0 if m._C is not None else 1)")
        started = time.time()
        try:
            subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, timeout=FUSED_KERNEL_BUILD_TIMEOUT_S,
                           preexec_fn=die_with_parent())
        except subprocess.TimeoutExpired:
            if lock.exists() and lock.stat().st_mtime >= started - 1:  # ours: the build we just ended made it
                lock.unlink(missing_ok=True)
            seam.give_up_kernel(logei)
            return (f"building BoTorch's fused multi-objective kernel took over {FUSED_KERNEL_BUILD_TIMEOUT_S} s; "
                    "using the slower pure-Python version")
        if not (build / "logei_fused_ext.so").exists():  # no compiler here: BoTorch's own fallback, quietly
            seam.give_up_kernel(logei)
            return None
    seam.load_kernel(logei)  # built: loads at once
    return None

"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter; it must be switched on before triton is
imported anywhere, so it is set here (conftest is imported before any test module).
"""
import os

if os.environ.get("CUDA_VISIBLE_DEVICES", "") == "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

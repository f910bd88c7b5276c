"""rci_fast: a fast trainer for LLMs that reason with a code interpreter.

The top-level folders kernels/ and sandbox/ install as rci_fast.kernels and rci_fast.sandbox
(a bare `kernels` or `sandbox` package would collide with other distributions).
"""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

sandbox_core = Pybind11Extension(
    "rci_fast.sandbox._core",
    sorted(glob.glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing"],
)

setup(
    name="rci_fast",
    version="0.1.0",
    description="Fast multi-turn SFT + GRPO trainer for code-interpreter reasoning (R1-Code-Interpreter recipe)",
    python_requires=">=3.10",
    packages=find_packages(include=["rci_fast", "rci_fast.*"]) + ["rci_fast.kernels", "rci_fast.sandbox"],
    package_dir={"rci_fast": "rci_fast", "rci_fast.kernels": "kernels", "rci_fast.sandbox": "sandbox"},
    # The C++ CPU kernels are built on first use (model/native.py); split.json is the tasks' train/test split.
    package_data={"rci_fast.model": ["cpu_kernels.cpp", "small_gemm.cpp", "small_gemm.h"],
                  "rci_fast.rollout": ["sampling.cpp"], "rci_fast.tasks": ["split.json"]},
    ext_modules=[sandbox_core],
    cmdclass={"build_ext": build_ext},
    # The sandbox alone needs only these (it never imports torch); training needs [train].
    install_requires=["numpy>=1.24", "sympy>=1.12"],
    extras_require={
        "train": ["torch>=2.6", "triton>=3.2", "transformers>=4.45", "safetensors>=0.4",
                  "tokenizers>=0.20", "pyyaml>=6", "tqdm>=4.66", "reasoning-gym>=0.1.25",
                  "ninja>=1.11"],  # ninja: builds the C++ CPU kernels (model/*.cpp, rollout/sampling.cpp) on first use
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pyflakes>=3", "tensorboard>=2.14"],
        "demo": ["matplotlib>=3.7"],  # the plots of `rci-fast demo`'s report
        "bench": ["trl==1.16.0"],  # bench/bench_vs_trl.py (pulls accelerate, datasets; keeps torch)
    },
    entry_points={"console_scripts": ["rci-fast=rci_fast.cli:main"]},
)

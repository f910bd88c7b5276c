"""rci_fast.train: the training loops (SFT today) on FSDP2, with DCP checkpoints and HF export.

    from rci_fast.config import load_config
    from rci_fast.train import init_distributed, run_sft
    info = init_distributed()            # torchrun env, or a one-process group
    run_sft(load_config("configs/smoke.yaml", ["train.max_steps=10"]), info)

Names load on first use, so `rci-fast --help` (which imports train.cli) does not import torch.
"""
import importlib

_EXPORTS = {"DistInfo": "distributed", "init_distributed": "distributed", "SFTTrainer": "sft",
            "TrainingDiverged": "sft", "run_sft": "sft"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rci_fast.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rci_fast.train' has no attribute {name!r}")

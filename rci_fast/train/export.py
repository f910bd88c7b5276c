"""Export a training checkpoint as a Hugging Face folder (safetensors + config + tokenizer)."""
from __future__ import annotations

from pathlib import Path

import torch

from rci_fast.config import RLConfig, SFTConfig
from rci_fast.train.checkpoint import export_hf, latest_checkpoint, load_model_weights
from rci_fast.train.distributed import DistInfo
from rci_fast.train.model_source import prepare_model_source
from rci_fast.train.parallelize import load_sharded

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def export_checkpoint(cfg: SFTConfig | RLConfig, dist_info: DistInfo, out_dir: str | Path,
                      checkpoint: str | Path | None = None, dtype: str = "bf16") -> Path:
    """Writes the weights of `checkpoint` (default: the latest under <out_dir of cfg>/checkpoints)
    to `out_dir`. Collective; returns the checkpoint that was exported."""
    root = Path(cfg.out_dir) / "checkpoints"
    path = Path(checkpoint) if checkpoint else latest_checkpoint(root)
    if path is None or not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"no complete checkpoint at {path or root}")
    if cfg.model.path is None and not (Path(cfg.out_dir) / "init_model" / "config.json").is_file():
        raise FileNotFoundError(f"{cfg.out_dir}/init_model is missing: it holds the tiny model's "
                                "architecture and tokenizer that the checkpoint was trained from")
    model_dir, tokenizer = prepare_model_source(cfg, None, dist_info)
    model = load_sharded(model_dir, dist_info, torch.float32, weights=False)  # the checkpoint's come next
    load_model_weights(path, model)
    export_hf(model, model.model, tokenizer, out_dir, DTYPES[dtype])
    return path

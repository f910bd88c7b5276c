"""Sharded checkpoints (torch.distributed.checkpoint) with exact resume, and HF export.

A checkpoint `<root>/step_00000012/` holds the model and optimizer shards (DCP: each rank writes
its own shards; a later run may use another number of ranks), `scheduler.pt`, one RNG file per
rank and `trainer_state.json` (step, data position, ...). It is written under a temporary name
and renamed when every rank is done; `<root>/latest` names the newest complete one and is
replaced atomically, so a crash at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from rci_fast.files import atomic_open, atomic_write_text
from rci_fast.model import Transformer
from rci_fast.model.checkpoint import save_pretrained

LATEST = "latest"
log = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = Path(root)
    rank = dist.get_rank()
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))  # fsyncs its files
    with atomic_open(tmp / f"rng_rank{rank}.pt", "wb") as f:
        torch.save(rng_state(), f)
    if rank == 0:
        with atomic_open(tmp / "scheduler.pt", "wb") as f:
            torch.save(scheduler.state_dict(), f)
        state = json.dumps({**trainer_state, "world_size": dist.get_world_size()}, indent=2)
        atomic_write_text(tmp / "trainer_state.json", state)
    dist.barrier()  # every rank's files are in tmp, on disk
    if rank == 0:
        if final.exists():  # a rerun of the same step after a resume from an older checkpoint
            shutil.rmtree(final)
        _sync_dir(tmp)  # its entries (renamed-in files too), then the rename, then latest: in order
        os.rename(tmp, final)
        _sync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        _sync_dir(root)  # latest on disk before pruning deletes what an older latest named
        _prune(root, step, keep)
    dist.barrier()
    return final


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _prune(root: Path, current: int, keep: int) -> None:
    """Keeps the newest `keep` checkpoints up to `current`. Ones beyond it were left by a run that
    died before naming them latest; this run redid those steps, so they are stale."""
    done = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of)
    stale = [p for p in done if _step_of(p) > current]
    older = [p for p in done if _step_of(p) <= current][:-keep]
    for path in stale + older:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Collective: restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    # The checkpoint gives the step and the optimizer's moments; the hyperparameters (lr schedule,
    # betas, eps, weight decay) are this run's config's, which a resumed run may have changed
    # (train.max_steps, train.lr, ...): they apply from this step on.
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    scheduler.base_lrs = base_lrs
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (saved with another world size); RNG not restored",
                    path, dist.get_rank())
    return json.loads((path / "trainer_state.json").read_text())


def load_model_weights(path: str | Path, model) -> None:
    """Collective: only the model's tensors of a checkpoint (for export or evaluation)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def export_hf(model, inner: Transformer, tokenizer, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Collective: gathers the full state dict to rank 0, which writes an HF folder (config.json,
    safetensors, tokenizer) that transformers and vLLM load. `model` is the sharded module and
    `inner` the Transformer inside it (for its config); written under a temporary name, then renamed
    (a previous export is renamed aside first and deleted last)."""
    prefix = next(name for name, module in model.named_modules() if module is inner)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        state = {k.removeprefix(prefix + "."): v.to(dtype) for k, v in full.items()}
        with torch.device("meta"):
            plain = Transformer(inner.config)
        missing, unexpected = plain.load_state_dict(state, assign=True, strict=False)
        tied = inner.config.tie_word_embeddings
        if tied:
            plain.lm_head.weight = plain.model.embed_tokens.weight
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"export: state dict does not match the model (missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]})")
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(plain, str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        # The old folder moves aside before the new one takes its name: at every moment one of
        # them is complete under out_dir or its .old- name.
        old = out_dir.with_name(f".old-{out_dir.name}")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()

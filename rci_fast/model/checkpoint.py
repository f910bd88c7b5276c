"""Hugging Face checkpoint I/O: config.json + *.safetensors (single file or sharded with an index)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rci_fast.model.config import ModelConfig
from rci_fast.model.transformer import Transformer, rope_inv_freq

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers older checkpoints stored (transformers recomputes them, and so does rci_fast).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

log = logging.getLogger("rci_fast.model")


def load_pretrained(path: str, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Transformer:
    """Builds the model from `path/config.json` and loads its safetensors weights."""
    cfg = read_config(path)  # first: an unsupported architecture is the clearer error
    state = _read_safetensors(path)
    model = empty_model(cfg, dtype or next(iter(state.values())).dtype, device)
    check_tensor_names(path, state, model)
    model.load_state_dict(state, strict=False)  # only a tied lm_head is absent, checked above
    return model


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """The model with uninitialised weights (for a caller that copies weights in next)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)  # stays float32
    return model.eval()


def read_config(path: str) -> ModelConfig:
    """The model's config from path/config.json, its head tied or not as transformers loads it."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(config_path) as f:
        return _tie_as_stored(path, ModelConfig.from_hf(json.load(f)))


def _tie_as_stored(path: str, cfg: ModelConfig) -> ModelConfig:
    """A tied model whose checkpoint also stores an lm_head.weight: transformers keeps the tie
    when that tensor equals the embedding, and unties the two when it does not (both loaded).
    Loading it tied would train one of the two tensors in place of the other."""
    if not cfg.tie_word_embeddings:
        return cfg
    try:
        files = tensor_files(path)
    except FileNotFoundError:  # a folder without weights yet (empty_model's callers fill them in)
        return cfg
    if "lm_head.weight" not in files:
        return cfg
    stored = []
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        with safe_open(files[name], framework="pt") as f:
            stored.append(f.get_tensor(name))
    if stored[0].shape == stored[1].shape and torch.equal(*stored):
        return cfg
    log.warning("%s: tie_word_embeddings is set but lm_head.weight differs from the embedding: loaded "
                "untied, as transformers does", path)
    return dataclasses.replace(cfg, tie_word_embeddings=False)


def tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> the safetensors file that holds it."""
    where = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            where.update((name, file) for name in f.keys())
    return where


def check_tensor_names(path: str, names, model: Transformer) -> None:
    """Raises KeyError naming what the checkpoint at `path` lacks or has beyond `model`'s tensors."""
    own = set(model.state_dict())
    expected = {k for k in own if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - set(names))
    if missing:
        raise KeyError(f"checkpoint {path!r} lacks tensors: {', '.join(missing[:8])}"
                       + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    unexpected = sorted(n for n in set(names) - own if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise KeyError(f"checkpoint {path!r} has tensors this architecture does not use: "
                       f"{', '.join(unexpected[:8])}")


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of the checkpoint at `path` (one, or the shards of its index)."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, SINGLE)):
        names = [SINGLE]
    else:
        raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path!r}")
    return [os.path.join(path, name) for name in names]


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        state.update(load_file(file))
    return state


def save_pretrained(model: Transformer, out_dir: str, max_shard_bytes: int | None = None) -> None:
    """Writes config.json and safetensors (sharded above `max_shard_bytes`) that transformers
    loads. The folder is written next to `out_dir` and renamed into place: never half-written."""
    cfg = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        shards = _shard(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            hf = cfg.to_hf()
            # both spellings: transformers 5 reads dtype before torch_dtype
            hf["dtype"] = hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
            json.dump(hf, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shard(state: dict, max_bytes: int | None) -> list[dict]:
    if not max_bytes:
        return [state]
    shards, current, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += n
    return shards + [current] if current else shards


Transformer.save_pretrained = save_pretrained

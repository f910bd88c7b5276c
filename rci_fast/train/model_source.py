"""Where the weights and tokenizer to train come from: an HF folder (model.path), or, when
model.path is null, a tiny random Qwen2 with a byte-level BPE tokenizer trained on the SFT data,
built once by rank 0 into <out_dir>/init_model (so every rank and every resume loads the same)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from rci_fast.config import SFTConfig
from rci_fast.model import ModelConfig, Transformer, save_pretrained
from rci_fast.tasks.prompt import render_chat
from rci_fast.tokenizer import train_bpe_tokenizer
from rci_fast.train.distributed import DistInfo


RECIPE = "recipe.json"  # in init_model: what it was built from (tiny_recipe)


def write_model_folder(model: Transformer, tokenizer, out_dir: Path, files: dict[str, str] | None = None) -> None:
    """Weights, config, tokenizer and `files` (name -> text) into one folder, written beside
    out_dir and renamed into place (out_dir must not exist yet)."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    os.rename(tmp, out_dir)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tiny_recipe(cfg: SFTConfig) -> dict:
    """What the tiny model is built from: its settings, the seed, and the SFT data its tokenizer
    is trained on."""
    return {"tiny": dataclasses.asdict(cfg.model.tiny), "seed": cfg.seed,
            "data_sha256": file_sha256(cfg.data.train_file)}


def check_recipe(folder: Path, recipe: dict) -> None:
    """A tiny model built earlier (a previous or interrupted run in this out_dir) is reused only
    if it was built from the same recipe: else the run would silently train another model than
    its config says. Folders from before recipes were written are taken as they are."""
    file = folder / RECIPE
    if not file.is_file():
        return
    built = json.loads(file.read_text())
    if built != recipe:
        changed = sorted(k for k in {**built["tiny"], **recipe["tiny"]}
                         if built["tiny"].get(k) != recipe["tiny"].get(k))
        what = ([f"model.tiny.{k}: {built['tiny'].get(k)} -> {recipe['tiny'].get(k)}" for k in changed]
                + [f"seed: {built['seed']} -> {recipe['seed']}"] * (built["seed"] != recipe["seed"])
                + ["data.train_file's contents"] * (built["data_sha256"] != recipe["data_sha256"]))
        raise ValueError(f"{folder} was built from other settings than this config's ({'; '.join(what)}): use "
                         f"another out_dir, or delete {folder} and {folder.parent / 'checkpoints'} to start over")


def build_tiny_model(cfg: SFTConfig, trajectories, out_dir: Path) -> None:
    """Writes config.json, safetensors and the tokenizer of a random tiny Qwen2 to out_dir."""
    tiny = cfg.model.tiny
    tokenizer = train_bpe_tokenizer((render_chat(t.messages) for t in trajectories), vocab_size=tiny.vocab_size)
    stop_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model_config = ModelConfig(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads, num_key_value_heads=tiny.num_key_value_heads,
        head_dim=tiny.hidden_size // tiny.num_attention_heads, rope_theta=10000.0,
        tie_word_embeddings=tiny.tie_word_embeddings, qkv_bias=True, eos_token_id=stop_ids,
        bos_token_id=stop_ids[1], max_position_embeddings=32768)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, tiny.init_std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    write_model_folder(model, tokenizer, out_dir, {RECIPE: json.dumps(tiny_recipe(cfg), indent=1)})


def load_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None, model_key: str = "model.path"):
    """The tokenizer in tokenizer_dir (model.tokenizer), else in the model's folder (named
    `model_key` in errors). One that cannot encode text is refused: from a folder that holds only
    config.json and weights, transformers builds a tokenizer of one token that encodes every text
    to nothing, and training would then run on no tokens and report success."""
    folder, key = (tokenizer_dir, "model.tokenizer") if tokenizer_dir else (model_dir, model_key)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{key}: no tokenizer folder {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) < 2 or not tokenizer.encode("a", add_special_tokens=False):
        raise FileNotFoundError(f"{key}: {folder} holds no tokenizer (tokenizer.json, or tokenizer_config.json "
                                "with its vocabulary files); set model.tokenizer to a folder that has one")
    return tokenizer


def prepare_model_source(cfg: SFTConfig, trajectories, dist_info: DistInfo):
    """(model folder, tokenizer). Collective when it has to build the tiny model."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: no config.json in {path}")
    else:
        path = Path(cfg.out_dir) / "init_model"
        if trajectories is not None:  # training (export only reads the folder)
            if (path / "config.json").is_file():  # on every rank: they fail alike
                check_recipe(path, tiny_recipe(cfg))
            elif not trajectories:
                raise ValueError(f"{cfg.data.train_file}: no trajectories to train the tiny model's tokenizer on")
            elif dist_info.is_main:
                build_tiny_model(cfg, trajectories, path)
        dist_info.barrier()
    return str(path), load_tokenizer(path, cfg.model.tokenizer)

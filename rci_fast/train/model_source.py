"""Where the weights and tokenizer to train come from: an HF folder (model.path), or, when
model.path is null, a tiny random Qwen2 with a byte-level BPE tokenizer trained on the SFT data,
built once by rank 0 into <out_dir>/init_model (so every rank and every resume loads the same)."""
from __future__ import annotations

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


def write_model_folder(model: Transformer, tokenizer, out_dir: Path) -> None:
    """Weights, config and tokenizer into one folder, written beside out_dir and renamed into
    place (out_dir must not exist yet)."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, str(tmp))
    tokenizer.save_pretrained(str(tmp))
    os.rename(tmp, out_dir)


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
    write_model_folder(model, tokenizer, out_dir)


def prepare_model_source(cfg: SFTConfig, trajectories, dist_info: DistInfo):
    """(model folder, tokenizer). Collective when it has to build the tiny model."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: no config.json in {path}")
        tokenizer_dir = cfg.model.tokenizer or str(path)
    else:
        path = Path(cfg.out_dir) / "init_model"
        if dist_info.is_main and not (path / "config.json").is_file():
            build_tiny_model(cfg, trajectories, path)
        dist_info.barrier()
        tokenizer_dir = cfg.model.tokenizer or str(path)
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"model.tokenizer: no tokenizer folder {tokenizer_dir}")
    return str(path), AutoTokenizer.from_pretrained(tokenizer_dir)

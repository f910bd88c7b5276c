"""load_sharded: a checkpoint read straight into FSDP2 shards (meta-device build, each rank reads
only its rows) holds exactly the weights load_pretrained reads whole, on 1 and on 2 ranks; and
sync_weights copies them back out into a plain model exactly."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rci_fast.model import load_pretrained
from rci_fast.train.distributed import init_distributed
from rci_fast.train.parallelize import load_sharded
from rci_fast.train.rollouts import sync_weights

ROOT = Path(__file__).resolve().parents[1]
# Odd first dimensions: 131 vocabulary rows split 66 / 65 over 2 ranks.
SMALL = dict(vocab_size=131, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2)


def write_checkpoints(root: Path) -> list[str]:
    """Three HF folders: Qwen2 tied (bf16), Qwen2 untied in 3 shards, Llama with biases."""
    torch.manual_seed(0)
    made = []
    for name, model, kwargs in [
        ("qwen2-tied-bf16", Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)), dict(dtype=torch.bfloat16)),
        ("qwen2-untied-sharded", Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=False)),
         dict(max_shard_size="40KB")),
        ("llama-biases", LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)), {}),
    ]:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1)  # norms and biases random too: every row matters
        if "dtype" in kwargs:
            model = model.to(kwargs.pop("dtype"))
        model.save_pretrained(root / name, **kwargs)
        made.append(str(root / name))
    assert len(list((root / "qwen2-untied-sharded").glob("*.safetensors"))) >= 3
    return made


def whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: FSDP's shards gathered, or the tensor itself (one process, no FSDP)."""
    return p.full_tensor() if isinstance(p, DTensor) else p


def compare(paths: list[str], dist_info) -> list[str]:
    """Every full tensor of load_sharded equals load_pretrained's (fp32); returns what was checked."""
    checked = []
    for path in paths:
        wrapper = load_sharded(path, dist_info, torch.float32)
        full = load_pretrained(path, dtype=torch.float32)
        ours = {name: whole(p) for name, p in wrapper.model.named_parameters()}
        assert set(ours) == {name for name, _ in full.named_parameters()}
        for name, p in full.named_parameters():
            assert torch.equal(ours[name], p), f"{path}: {name}"
        if full.config.tie_word_embeddings:
            assert wrapper.model.lm_head.weight is wrapper.model.model.embed_tokens.weight
        torch.testing.assert_close(wrapper.model.inv_freq, full.inv_freq, rtol=0, atol=0)
        # sync_weights: back from the shards into a plain model (the engine's copy), unit by unit
        with torch.no_grad():
            for p in full.parameters():
                p.zero_()
        sync_weights(wrapper, wrapper.model, full)
        for name, p in full.named_parameters():
            assert torch.equal(ours[name], p), f"{path}: sync_weights {name}"
        checked.append(Path(path).name)
    return checked


def test_one_rank_equals_the_whole_load(tmp_path):
    paths = write_checkpoints(tmp_path)
    info = init_distributed("cpu")
    try:
        assert compare(paths, info) == ["qwen2-tied-bf16", "qwen2-untied-sharded", "llama-biases"]
        # one process computing in fp32: no FSDP (it would shard and cast nothing), plain tensors
        assert not any(isinstance(p, DTensor) for p in load_sharded(paths[0], info, torch.float32).parameters())
        # the trainer's forward runs on what was loaded: the same log-probs as the whole model
        wrapper, full = load_sharded(paths[2], info, torch.float32), load_pretrained(paths[2], dtype=torch.float32)
        ids = torch.randint(0, 131, (1, 20), generator=torch.Generator().manual_seed(1))
        targets = torch.roll(ids[0], -1)
        logits = full(ids)[0]
        want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(wrapper(ids, targets), want, atol=1e-5, rtol=0)
    finally:
        info.close()


def test_clear_errors(tmp_path):
    [path, *_] = write_checkpoints(tmp_path)
    config = json.loads((Path(path) / "config.json").read_text())
    config["intermediate_size"] = 96
    (Path(path) / "config.json").write_text(json.dumps(config))
    info = init_distributed("cpu")
    try:
        with pytest.raises(ValueError, match="gate_proj.weight has shape"):
            load_sharded(path, info, torch.float32)
        with pytest.raises(FileNotFoundError, match="no config.json"):
            load_sharded(str(tmp_path / "nowhere"), info, torch.float32)
    finally:
        info.close()


WORKER = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_train_sharded_load import compare
from rci_fast.train.distributed import init_distributed
info = init_distributed("cpu")
checked = compare(json.loads(sys.argv[1]), info)
# each rank holds only its rows: the embedding's local shard is 66 or 65 of 131 rows
from rci_fast.train.parallelize import load_sharded
w = load_sharded(json.loads(sys.argv[1])[0], info, torch.float32)
rows = w.model.model.embed_tokens.weight.to_local().shape[0]
with open(f"{{sys.argv[2]}}/rank{{info.rank}}.txt", "w") as f:  # a file each: ranks' stdout lines interleave
    f.write(f"{{info.rank}} {{len(checked)}} {{rows}}")
info.close()
"""


@pytest.mark.slow
def test_two_ranks_each_read_their_rows(tmp_path):
    paths = write_checkpoints(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), str(script), json.dumps(paths), str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert ranks == [["0", "3", "66"], ["1", "3", "65"]]


def test_frozen_shards_in_the_compute_dtype(tmp_path):
    """master_dtype=bf16 (the frozen reference model): bf16 shards holding the checkpoint's bf16
    values exactly; the rotary frequencies stay fp32."""
    path = write_checkpoints(tmp_path)[0]  # stored in bf16
    info = init_distributed("cpu")
    try:
        wrapper = load_sharded(path, info, torch.bfloat16, master_dtype=torch.bfloat16)
        full = load_pretrained(path)  # the file's dtype: bf16
        for name, p in wrapper.model.named_parameters():
            assert p.dtype == torch.bfloat16 and torch.equal(whole(p), dict(full.named_parameters())[name])
        assert wrapper.model.inv_freq.dtype == torch.float32
    finally:
        info.close()

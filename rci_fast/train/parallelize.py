"""FSDP2 sharding applied from outside the model (as in torchtitan): one FSDP unit per decoder
block, then the root, with bf16 compute and fp32 gradient reduction on GPU, fp32 on CPU; and
loading a checkpoint straight into the shards (each rank reads only its own rows)."""
from __future__ import annotations

from collections import defaultdict

import torch
from safetensors import safe_open
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rci_fast.model import Transformer
from rci_fast.model.checkpoint import check_tensor_names, read_config, tensor_files
from rci_fast.model.transformer import rope_inv_freq
from rci_fast.train.distributed import DistInfo
from rci_fast.train.modeling import TokenLogprobs


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """train.mixed_precision: auto = bf16 on GPU, fp32 on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def parallelize(wrapper: TokenLogprobs, mesh: DeviceMesh, param_dtype: torch.dtype,
                activation_checkpointing: bool = False) -> TokenLogprobs:
    """Shards `wrapper` in place (parameters stay fp32 masters; `param_dtype` is what the forward
    computes in) and returns it. One process computing in its parameters' own dtype (a CPU run,
    or fp32 on one GPU) gets no FSDP: it would shard nothing and cast nothing, and its hooks,
    copies and DTensor dispatch cost ~55 of ~540 ms per update on the CPU benchmark. Same numbers
    to the bit. Callers move their inputs to the device themselves (FSDP's root did that too).
    The root does not cast forward inputs: the float ones (advantages, old/reference log-probs of
    the one-pass loss) stay fp32; the blocks still cast their hidden states."""
    wrapper.model.activation_checkpointing = activation_checkpointing
    if mesh.size() == 1 and all(p.dtype == param_dtype for p in wrapper.parameters()):
        return wrapper
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = wrapper.model.model.layers
    for i, layer in enumerate(layers):
        # The last block's parameters are gathered again by the root right after; keeping them
        # unsharded after forward saves one all-gather at the start of backward.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(wrapper, mesh=mesh, mp_policy=root_policy)
    return wrapper


def load_sharded(path: str, dist_info: DistInfo, param_dtype: torch.dtype, activation_checkpointing: bool = False,
                 weights: bool = True, master_dtype: torch.dtype = torch.float32) -> TokenLogprobs:
    """The HF checkpoint at `path` as a sharded TokenLogprobs (shards in `master_dtype`: fp32 for
    a model that trains, the compute dtype for a frozen one), without any rank ever holding the
    whole model: it is built on the meta device and sharded, then each rank reads only its own
    rows of each tensor from the memory-mapped safetensors files (a 7B model costs each of 8
    ranks ~3.8 GB of fp32 shards, not 30 GB). weights=False leaves the parameters uninitialised,
    for a caller that loads a training checkpoint next."""
    cfg = read_config(path)
    with torch.device("meta"):
        inner = Transformer(cfg).to(master_dtype)
    if weights:
        files = tensor_files(path)
        check_tensor_names(path, files, inner)
    wrapper = parallelize(TokenLogprobs(inner), dist_info.mesh, param_dtype, activation_checkpointing)
    wrapper.to_empty(device=dist_info.device)
    if cfg.tie_word_embeddings and inner.lm_head.weight is not inner.model.embed_tokens.weight:
        inner.lm_head.weight = inner.model.embed_tokens.weight  # to_empty unties a module FSDP left plain
    inner.inv_freq = rope_inv_freq(cfg).to(dist_info.device)  # a buffer, not in checkpoints
    if weights:
        _load_local_rows(inner, files)
    return wrapper


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of `param`, the first row's index in the full tensor). FSDP2 shards dim 0
    as torch.chunk does: ceil(n / world) rows per rank, the last ranks short or empty."""
    if not isinstance(param, DTensor):
        return param, 0
    mesh = param.device_mesh
    n = param.shape[0]
    per_rank = -(-n // mesh.size())
    start = min(mesh.get_local_rank() * per_rank, n)
    local = param.to_local()
    if local.shape[0] != min(per_rank, n - start):
        raise RuntimeError(f"unexpected FSDP shard layout: {local.shape[0]} local rows of {n} at row {start}")
    return local, start


@torch.no_grad()
def _load_local_rows(inner: Transformer, files: dict[str, str]) -> None:
    params = dict(inner.named_parameters())  # a tied lm_head appears once, as the embedding
    by_file = defaultdict(list)
    for name in params:
        by_file[files[name]].append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                param, stored = params[name], f.get_slice(name)
                if list(stored.get_shape()) != list(param.shape):
                    raise ValueError(f"{file}: {name} has shape {stored.get_shape()}, the config gives "
                                     f"{list(param.shape)}")
                local, start = _local_rows(param)
                if local.shape[0]:  # a rank past the last chunk holds no rows
                    local.copy_(stored[start:start + local.shape[0]])  # reads only these rows, cast to the shard's dtype


"""FSDP2 sharding applied from outside the model (as in torchtitan): one FSDP unit per decoder
block, then the root, with bf16 compute and fp32 gradient reduction on GPU, fp32 on CPU."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from rci_fast.train.modeling import TokenLogprobs


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """train.mixed_precision: auto = bf16 on GPU, fp32 on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def parallelize(wrapper: TokenLogprobs, mesh: DeviceMesh, param_dtype: torch.dtype,
                activation_checkpointing: bool = False) -> TokenLogprobs:
    """Shards `wrapper` in place (parameters stay fp32 masters; `param_dtype` is what the forward
    computes in) and returns it."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = wrapper.model.model.layers
    for i, layer in enumerate(layers):
        # The last block's parameters are gathered again by the root right after; keeping them
        # unsharded after forward saves one all-gather at the start of backward.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(wrapper, mesh=mesh, mp_policy=policy)
    wrapper.model.activation_checkpointing = activation_checkpointing
    return wrapper

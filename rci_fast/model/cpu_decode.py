"""A decode step in C++ for float32 models on a CPU (cpu_decode.cpp), built on first use.

On a CPU a small model's decode step is mostly the cost of calling ~120 torch operators from
Python, not their arithmetic (bench/RESULTS.md): the C++ step runs a layer as five ATen calls and
three loops. Same result as Transformer.forward_cached + lm_head to float32 rounding
(tests/test_cpu_decode.py); the rollout engine uses it for its one-token-per-row steps.

The build (torch.utils.cpp_extension, ~20 s once, cached under ~/.cache/torch_extensions) needs
a C++ compiler and ninja; without them `CpuDecodeStep.available()` is False, with a warning that
says why, and the engine stays on the Python path.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings

import torch

from rci_fast.model.transformer import KVCache, Transformer

_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_decode.cpp")
_lock = threading.Lock()
_state: dict[str, str | bool] = {}  # "loaded": True, or "error": why the build failed


def _build() -> bool:
    """Builds and loads the extension once per process; False (with a warning) if it cannot."""
    with _lock:
        if not _state:
            try:
                from torch.utils.cpp_extension import load
                # torch looks for ninja on PATH; pip installs it beside this interpreter.
                here, path = os.path.dirname(sys.executable), os.environ.get("PATH", "")
                if here not in path.split(os.pathsep):
                    os.environ["PATH"] = here + os.pathsep + path
                # -fopenmp: at::parallel_for is inline code with an OpenMP pragma (torch's own libgomp
                # serves it at run time: same soname, already loaded).
                load("rci_fast_cpu_decode", [_SOURCE], extra_cflags=["-O3", "-fopenmp", "-Wno-psabi"],
                     extra_ldflags=["-fopenmp"], is_python_module=False)
                _state["loaded"] = True
            except Exception as e:  # no compiler, no ninja, a failed build: the Python path still works
                _state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"rci_fast's C++ decode step could not be built; decoding on a CPU "
                              f"uses the slower Python path ({_state['error'][:500]})")
    return bool(_state.get("loaded"))


class CpuDecodeStep:
    """model's decode step with its weights as they are now (q/k/v and gate/up concatenated):
    build a new one after the weights change, as for Transformer.fuse_projections."""

    @staticmethod
    def supports(model: Transformer) -> bool:
        """Whether the C++ step can run this model: float32 weights on a CPU."""
        w = model.lm_head.weight
        return w.device.type == "cpu" and w.dtype == torch.float32

    @staticmethod
    def available() -> bool:
        """Whether the extension is built and loaded (building it on the first call)."""
        return _build()

    def __init__(self, model: Transformer):
        if not self.supports(model):
            raise ValueError("the C++ decode step needs a float32 model on a CPU")
        if not _build():
            raise RuntimeError(f"the C++ decode step could not be built: {_state['error']}")
        cfg = model.config
        model.fuse_projections()
        body = model.model
        # Projections transposed to [in, out] (see project() in cpu_decode.cpp).
        weights = [body.embed_tokens.weight, body.norm.weight, model.lm_head.weight.t()]
        for layer, fused in zip(body.layers, model._fused):
            attn, mlp = layer.self_attn, layer.mlp
            weights += [layer.input_layernorm.weight, fused["qkv"][0].t(), fused["qkv"][1],
                        attn.o_proj.weight.t(), attn.o_proj.bias, layer.post_attention_layernorm.weight,
                        fused["gate_up"][0].t(), fused["gate_up"][1], mlp.down_proj.weight.t(), mlp.down_proj.bias]
        self.weights = [None if w is None else w.detach().contiguous() for w in weights]
        self.inv_freq = model.inv_freq.float().contiguous()
        self.heads, self.kv_heads, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int, cache: KVCache) -> torch.Tensor:
        """Logits [B, vocab] for tokens ids [B] at positions [B] of cache slots first_slot.. in order,
        writing their keys and values into the cache."""
        cache.zero_upto(int(positions.max()) + 1)  # the Python path may read this cache later
        return torch.ops.rci_fast_cpu_decode.decode_step(
            ids, positions, first_slot, cache.k, cache.v, self.inv_freq, self.weights,
            self.heads, self.kv_heads, self.eps)

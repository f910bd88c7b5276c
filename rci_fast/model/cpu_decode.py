"""A decode step in C++ for float32 models on a CPU (cpu_kernels.cpp, built by native.py).

On a CPU a small model's decode step is mostly the cost of calling ~120 torch operators from
Python, not their arithmetic (bench/RESULTS.md): the C++ step runs a layer as four GEMMs and a few
elementwise calls around three loops. Same result as Transformer.forward_cached + lm_head to
float32 rounding (tests/test_cpu_decode.py); the rollout engine uses it for its
one-token-per-row steps.
"""
from __future__ import annotations

import torch

from rci_fast.model import native
from rci_fast.model.transformer import KVCache, Transformer


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
        return native.available()

    def __init__(self, model: Transformer):
        if not self.supports(model):
            raise ValueError("the C++ decode step needs a float32 model on a CPU")
        if not native.available():
            raise RuntimeError(f"the C++ decode step could not be built: {native.error()}")
        cfg = model.config
        model.fuse_projections()
        body = model.model
        # Projections [in, out] in panels of 32 columns, the layout small_gemm.cpp multiplies. The
        # panels keep a width only to a multiple of 32: the step takes each from the head counts,
        # the first MLP and the vocabulary, so every projection must match those exactly.
        pack = torch.ops.rci_fast_cpu.pack_panels
        inter = body.layers[0].mlp.down_proj.weight.shape[1] if len(body.layers) else 0
        widths = {"qkv": (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim,
                  "gate_up": 2 * inter, "lm_head": body.embed_tokens.weight.shape[0]}

        def projection(weight, name=None):
            if name is not None and weight.shape[0] != widths[name]:
                raise ValueError(f"the C++ decode step needs {widths[name]} outputs for {name}, "
                                 f"got {weight.shape[0]}")
            return pack(weight.detach().t())

        weights = [body.embed_tokens.weight, body.norm.weight, projection(model.lm_head.weight, "lm_head")]
        for layer, fused in zip(body.layers, model._fused):
            attn, mlp = layer.self_attn, layer.mlp
            weights += [layer.input_layernorm.weight, projection(fused["qkv"][0], "qkv"), fused["qkv"][1],
                        projection(attn.o_proj.weight), attn.o_proj.bias, layer.post_attention_layernorm.weight,
                        projection(fused["gate_up"][0], "gate_up"), fused["gate_up"][1],
                        projection(mlp.down_proj.weight), mlp.down_proj.bias]
        self.weights = [None if w is None else w.detach().contiguous() for w in weights]
        self.inv_freq = model.inv_freq.float().contiguous()
        self.heads, self.kv_heads, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int, cache: KVCache,
                 prefix: torch.Tensor | None = None, max_position: int | None = None) -> torch.Tensor:
        """Logits [B, vocab] for tokens ids [B] at positions [B] of cache slots first_slot.. in order,
        writing their keys and values into the cache. prefix [2, B] (slots, lengths), optional:
        row b reads its positions below lengths[b] from slot slots[b], which must hold the same
        keys and values there (a shared prompt: one copy read by many rows stays in cache).
        max_position: the largest of positions, when the caller knows it (else read from them)."""
        if max_position is None:
            max_position = int(positions.max())
        cache.zero_upto(max_position + 1)  # the Python path may read this cache later
        slots, lengths = (None, None) if prefix is None else prefix
        return torch.ops.rci_fast_cpu.decode_step(
            ids, positions, first_slot, cache.k, cache.v, self.inv_freq, self.weights,
            self.heads, self.kv_heads, self.eps, slots, lengths)

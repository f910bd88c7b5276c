"""A decoder-only transformer for the Qwen2 and Llama families.

Parameter names match Hugging Face's, so checkpoints load and save without a name map. The model
knows nothing of distributed training, rollouts or tasks: FSDP is applied from outside.

Three ways to run attention:
  - dense [B, T]: every row is one sequence, causal;
  - packed [1, N] with `cu_seqlens`: several sequences back to back, no padding; on CUDA in
    bf16/fp16 flash-attn's varlen kernel when installed, else torch's (torch.nn.attention.varlen);
    on a CPU in float32 rci_fast's C++ kernel (cpu_ops.varlen_attention); otherwise (fp32 on a
    GPU, no varlen kernel, no C++ build) sequences of similar length padded into one SDPA call
    each (padded_groups_attention). With `expand`, sequences that begin with the same prompt
    (a GRPO group) hold it once in the input: every per-token layer runs on it once, and only
    attention sees the sequences whole (its q/k/v gathered into them, each input token's output
    taken from its first place);
  - cached [B, T] with a KVCache: the rollout engine's decode and extend steps.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from rci_fast.model.config import ModelConfig
from rci_fast.model.cpu_ops import rms_norm, rope, silu_mul, varlen_attention, varlen_attention_applies

try:  # optional, GPU only
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:  # torch's own flash varlen kernel (CUDA), used when flash-attn is not installed
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
    if not {"window_size", "enable_gqa"} <= set(inspect.signature(torch_varlen_attn).parameters):
        torch_varlen_attn = None  # an older signature than the one this code is written for
except ImportError:
    torch_varlen_attn = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # fused in C++ for float32 on a CPU


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    # float32 exactly as transformers computes it, so that greedy decoding agrees token for token
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # Llama 3.1: stretch low frequencies, keep high ones, blend between
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [..., T, head_dim] for integer positions [..., T]."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# SDPA on CUDA without cuDNN's backend: it plans a new graph for every new shape, ~2 ms of CPU per
# call and layer (measured on an H200 in decoding, 20x the GPU time of a whole decode step), and
# decode steps bring a new key length each, packed training batches new padded shapes per
# micro-batch. On a CPU the default choice is the fastest.
CUDA_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, on CUDA from CUDA_SDPA_BACKENDS. There float32 with grouped
    key/value heads gets them repeated (repeat_kv): flash refuses float32, and the efficient
    kernel takes enable_gqa only in torch builds from 2026-07 on, which left the MATH backend
    (a full score tensor, ~25 kernels a call)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if kwargs.get("enable_gqa") and q.dtype == torch.float32 and k.shape[-3] != q.shape[-3]:
        k, v = repeat_kv(k, v, q.shape[-3] // k.shape[-3])
        kwargs["enable_gqa"] = False
    with sdpa_kernel(CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def repeat_kv(k: torch.Tensor, v: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value heads [..., kv_heads, T, D] repeated for `group` query heads each, as SDPA's
    enable_gqa pairs them (query head h reads key/value head h // group)."""
    return k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)


class KVCache:
    """Keys and values of `num_slots` sequences, up to `max_len` tokens each, for every layer.

    zero_all=False leaves the memory as allocated and zeroes positions on first use instead
    (zero_upto): a cache sized for 4k tokens whose sequences stop at 160 then costs nothing to
    set up (on a CPU, zeroing it all took longer than 10 decode steps). Zeroing matters: attention
    reads the masked cells too, and 0 x NaN from stale memory would poison the output."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", zero_all: bool = True):
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        new = torch.zeros if zero_all else torch.empty
        self.k = new(shape, dtype=dtype, device=device)
        self.v = new(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.zeroed = max_len if zero_all else 0  # positions below this hold zeros or written values

    def zero_upto(self, length: int) -> None:
        if length > self.zeroed:
            end = min(-(-length // 64) * 64, self.max_len)  # 64 positions at a time: fewer, larger fills
            self.k[..., self.zeroed:end, :].zero_()
            self.v[..., self.zeroed:end, :].zero_()
            self.zeroed = end


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, packed: "PackedLayout | None" = None, step=None):
        B, T, _ = x.shape
        if step is not None and step.fused is not None:  # inference: one GEMM for q, k and v
            w, b = step.fused[self.layer_idx]["qkv"]
            q, k, v = F.linear(x, w, b).split([self.n_heads * self.d, self.n_kv * self.d, self.n_kv * self.d], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.d).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.d).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # fused in C++ for float32 on a CPU
        if step is not None:
            out = self._cached(q, k, v, step)
        elif packed is not None:
            out = self._packed(q, k, v, packed)
        else:
            out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.d))

    def _packed(self, q, k, v, packed: "PackedLayout"):
        if packed.expand is None:
            return self._varlen(q, k, v, packed)
        # Shared prompts: the sequences' own layout for attention (the index_select backward sums
        # a shared prompt's key/value gradients over its sequences), then back to the input's;
        # gathered token by token, so the kernels see the memory layout of the plain path.
        def gather(t, index):
            return t.transpose(1, 2).index_select(1, index).transpose(1, 2)
        q, k, v = (gather(t, packed.expand) for t in (q, k, v))
        return gather(self._varlen(q, k, v, packed, only_first=True), packed.first)

    def _varlen(self, q, k, v, packed: "PackedLayout", only_first: bool = False):
        """only_first: the caller reads each input token's output at its first place only, so the
        C++ kernel may leave out a shared prompt's query rows in its later copies."""
        varlen = flash_attn_varlen_func or torch_varlen_attn
        if varlen is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            max_len, cu = packed.max_len, packed.cu_seqlens_int32()
            q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [N, heads, head_dim]
            if flash_attn_varlen_func is not None:
                out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
            else:
                out = torch_varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0), enable_gqa=True)
            return out.transpose(0, 1).unsqueeze(0)
        if varlen_attention_applies(q, k, v):  # float32 on a CPU: C++, no padding
            return varlen_attention(q, k, v, packed.cu_seqlens, packed.query_from() if only_first else None)
        return padded_groups_attention(q, k, v, packed)

    def _cached(self, q, k, v, step: "CachedStep"):
        k_all, v_all = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]  # [S, kv, L, D]
        k_all[step.rows, :, step.positions] = k.transpose(1, 2)
        v_all[step.rows, :, step.positions] = v.transpose(1, 2)
        keys, values = step.view(k_all), step.view(v_all)
        return sdpa(q, keys, values, attn_mask=step.mask, enable_gqa=True)


# Measured on 2 CPU threads, causal SDPA forward + backward at 4 heads of 32: a call costs ~120 us
# however short its sequence (130 us at 16 tokens), and each unit of area (query x key
# positions, counted as the full square) 0.065-0.11 ns per head and head dim (8.4-14.8 ns at
# 4 x 32, less at 1024 tokens than at 128). Padding sequences into one call pays off while the
# area it adds, times heads x head_dim, stays under 120 us / 0.11 ns ~ 2^20 per call saved: the
# cautious end.
PADDED_AREA_PER_CALL = 1 << 20
# On a GPU (this path runs there only in fp32 or without a varlen kernel) a call is launches:
# forward + backward ~6 kernels at ~5-17 us each in the VMs measured (bench/RESULTS.md), ~50 us;
# a unit of area costs ~12 FLOPs per head and head dim (forward and backward) at tens of
# TFLOP/s, ~0.0004 ns. The break-even is then ~2^37, beyond what a batch pads; 2^26 still merges
# the sequences of one micro-batch (16 of 150-350 tokens: one call, not 9, per layer) while a
# batch of one long and many short sequences keeps the long one apart (padding all to its length
# would multiply the tokens). Derived, not yet measured: bench_train_step --device cuda shows it.
PADDED_AREA_PER_CALL_CUDA = 1 << 26


def length_groups(lengths: list[int], max_waste_per_merge: float) -> list[list[int]]:
    """Sequence indices grouped for padded attention calls: longest first, a sequence joins the
    current group while the group's padded area (count x longest^2 - sum of length^2) stays within
    max_waste_per_merge per sequence merged. Each group lists its indices in increasing order;
    empty sequences are left out (they hold no token)."""
    groups: list[list[int]] = []
    waste = 0.0
    for i in sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i]):
        if groups:
            longest = lengths[groups[-1][0]]
            added = longest ** 2 - lengths[i] ** 2
            if waste + added <= max_waste_per_merge * len(groups[-1]):
                groups[-1].append(i)
                waste += added
                continue
        groups.append([i])
        waste = 0.0
    return [sorted(g) for g in groups]


class PackedLayout:
    """Where each sequence of a packed batch lies in the token stream, shared by every layer of one
    forward: the bounds come to the host once (on a GPU each read is a sync that stalls the host,
    once per layer before), and the padded-groups plan is built once, not per layer."""

    def __init__(self, cu_seqlens: torch.Tensor, expand: torch.Tensor | None = None, inputs: int | None = None):
        self.cu_seqlens = cu_seqlens
        bounds = cu_seqlens.tolist()
        if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
            shown = f"{bounds[:8]}" + ("..." if len(bounds) > 8 else "")
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {shown}")
        self.starts = bounds[:-1]
        self.lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        self.total = bounds[-1]
        self.max_len = max(self.lengths, default=0)
        self._int32: torch.Tensor | None = None
        self._plans: dict[tuple, tuple] = {}
        self._query_from: torch.Tensor | None = None
        # expand [total]: token j of the sequences is input token expand[j] of `inputs` (shared
        # prompts held once in the input); first [inputs]: each input token's first place in the
        # sequences. Checked where it lives on the host (on a GPU a check would be a sync).
        # Without expand the sequences are the input itself: `inputs`, when given, is total.
        self.expand, self.first = expand, None
        if expand is None and inputs is not None and inputs != self.total:
            raise ValueError(f"cu_seqlens covers {self.total} tokens, input_ids holds {inputs}: a batch packed with "
                             "shared prompts (data.pack_shared_prompts) needs its expand")
        if expand is not None:
            if inputs is None:
                raise ValueError("expand needs the number of input tokens (inputs)")
            if expand.shape != (self.total,):
                raise ValueError(f"expand must hold one input index per token of the sequences ({self.total}), "
                                 f"got shape {tuple(expand.shape)}")
            on_host = expand.device.type == "cpu"
            wrong = ValueError(f"expand must place each of the {inputs} input tokens in the sequences, "
                               "and nothing else")
            if on_host and self.total and not 0 <= int(expand.min()) <= int(expand.max()) < inputs:
                raise wrong
            places = torch.arange(self.total, device=expand.device)
            self.first = torch.full((inputs,), self.total, dtype=torch.long, device=expand.device).scatter_reduce_(
                0, expand, places, reduce="amin")
            if on_host and bool((self.first == self.total).any()):
                raise wrong

    def cu_seqlens_int32(self) -> torch.Tensor:
        if self._int32 is None:
            self._int32 = self.cu_seqlens.to(torch.int32)
        return self._int32

    def positions(self) -> torch.Tensor:
        """Positions restarting in each sequence, [0, 1, .., n0-1, 0, 1, .., n1-1, ...], without
        a host sync (the bounds are on the host already)."""
        device = self.cu_seqlens.device
        starts = torch.repeat_interleave(self.cu_seqlens[:-1], self.cu_seqlens.diff(), output_size=self.total)
        return torch.arange(self.total, device=device) - starts

    def query_from(self) -> torch.Tensor:
        """[S], for a layout with expand: in each sequence the place of its first token that is
        some input token's first place (0 for a prompt's first copy, the prompt's length for its
        others); the sequence's length where it has none. On the host (the C++ attention reads it)."""
        if self.expand is None:
            raise ValueError("query_from needs a layout with expand (shared prompts)")
        if self._query_from is None:
            bounds, first = torch.tensor(self.starts + [self.total]), self.first.cpu()
            seq = torch.searchsorted(bounds, first, right=True) - 1  # each first place's sequence
            self._query_from = torch.tensor(self.lengths).scatter_reduce_(
                0, seq, first - bounds[seq], reduce="amin")
        return self._query_from

    def input_positions(self) -> torch.Tensor:
        """Each input token's position: positions() itself, or with expand its first place's
        (a shared prompt's tokens sit at the same positions in every sequence)."""
        return self.positions() if self.expand is None else self.positions().index_select(0, self.first)

    def padded_plan(self, max_waste_per_merge: float, device: torch.device):
        """(gather, back, shapes) for padded_groups_attention, the indices on `device`: stream ->
        padded rows, padded rows -> stream, and each group's (sequences, longest)."""
        key = (max_waste_per_merge, device)
        if key not in self._plans:
            self._plans[key] = self._build_plan(max_waste_per_merge, device)
        return self._plans[key]

    def _build_plan(self, max_waste_per_merge: float, device: torch.device):
        lengths, starts = self.lengths, self.starts
        groups = length_groups(lengths, max_waste_per_merge)
        if not groups:  # no tokens at all
            return None
        # Built on the host, then one copy each to the device.
        gather, base, shapes, offset = [], [0] * len(lengths), [], 0
        for group in groups:
            longest = max(lengths[i] for i in group)
            n = torch.tensor([lengths[i] for i in group])
            first = torch.tensor([starts[i] for i in group])
            # Padding repeats a sequence's last token: real positions only, nothing read past the stream.
            gather.append((first[:, None] + torch.minimum(torch.arange(longest), n[:, None] - 1)).flatten())
            for rank, i in enumerate(group):
                base[i] = offset + rank * longest - starts[i]  # stream position + base = padded position
            shapes.append((len(group), longest))
            offset += len(group) * longest
        back = torch.arange(self.total) + torch.repeat_interleave(torch.tensor(base), torch.tensor(lengths))
        return torch.cat(gather).to(device), back.to(device), shapes


def padded_groups_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            packed: "PackedLayout | torch.Tensor") -> torch.Tensor:
    """Causal attention of packed sequences without a varlen kernel: q [1, heads, N, D], k/v
    [1, kv_heads, N, D] -> [1, heads, N, D]; packed: the batch's PackedLayout (or its cu_seqlens).
    Sequences of similar length are gathered into a right-padded batch and run as one SDPA call
    (length_groups): one call per sequence costs more than the attention itself at short lengths.
    Padded keys come after every real one, so the causal mask alone keeps them unseen; padded
    queries are dropped. One gather per tensor in and one out for all groups, split and
    concatenated between: slicing each group out of the stream would make the backward fill a
    full-size gradient per group."""
    if not isinstance(packed, PackedLayout):
        packed = PackedLayout(packed)
    heads, d = q.shape[1], q.shape[-1]
    area = PADDED_AREA_PER_CALL_CUDA if q.is_cuda else PADDED_AREA_PER_CALL
    plan = packed.padded_plan(area / (heads * d), q.device)  # q's device: cu_seqlens may live elsewhere
    if plan is None:  # no tokens at all
        return torch.zeros_like(q)
    gather, back, shapes = plan
    sizes = [count * width for count, width in shapes]
    # index_select, not t[idx]: its backward (index_add_) is ~5x faster on CPU than indexing's.
    parts = [t[0].transpose(0, 1).index_select(0, gather).split(sizes) for t in (q, k, v)]  # [P, heads, D]
    outs = [sdpa(*(p.view(count, width, -1, d).transpose(1, 2) for p in group_parts),
                 is_causal=True, enable_gqa=True).transpose(1, 2).reshape(-1, heads, d)
            for (count, width), group_parts in zip(shapes, zip(*parts))]
    padded_out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return padded_out.index_select(0, back).transpose(0, 1).unsqueeze(0)


class CachedStep:
    """What every layer of one cached forward shares: where to write, what to read, the mask.

    slots None means rows 0..B-1 are slots 0..B-1; with `length` given too (at least the largest
    position + 1), nothing here reads a tensor's value on the host: the step can be captured in a
    CUDA graph."""

    def __init__(self, cache: KVCache, slots: torch.Tensor | None, positions: torch.Tensor,
                 fused: list[dict] | None = None, length: int | None = None):
        B, T = positions.shape
        self.cache, self.positions, self.fused = cache, positions, fused
        if slots is None:
            slots = torch.arange(B, device=positions.device)
            self._slice = slice(0, B)
        else:
            first = int(slots[0])
            contiguous = torch.equal(slots, torch.arange(first, first + B, device=slots.device))
            self._slice = slice(first, first + B) if contiguous else None
        self.rows = slots.unsqueeze(1).expand(B, T)
        self.length = int(positions.max()) + 1 if length is None else length
        cache.zero_upto(self.length)  # before any layer writes: cells past it were never written
        self._slots = slots
        # Query at position p sees cache positions 0..p of its own slot.
        self.mask = (torch.arange(self.length, device=positions.device)
                     <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, L]

    def view(self, cache_layer: torch.Tensor) -> torch.Tensor:
        if self._slice is not None:  # no copy when the rows are the slots in order
            return cache_layer[self._slice, :, :self.length]
        return cache_layer[self._slots, :, :self.length]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, fused_gate_up: tuple | None = None):
        if fused_gate_up is not None:  # inference: one GEMM for gate and up
            gate, up = F.linear(x, *fused_gate_up).chunk(2, dim=-1)
            return self.down_proj(silu_mul(gate, up))
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, packed: "PackedLayout | None" = None, step=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, packed, step)
        fused = step.fused[self.self_attn.layer_idx]["gate_up"] if step is not None and step.fused else None
        return x + self.mlp(self.post_attention_layernorm(x), fused)


class _Body(nn.Module):  # named `model` in the checkpoint, as in transformers
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.activation_checkpointing = False
        self._fused: list[dict] | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenates q/k/v and gate/up weights for forward_cached (fewer, larger GEMMs when
        decoding). A copy of the current weights: call again after the weights change."""
        def cat(*linears):
            biases = [l.bias for l in linears]
            bias = None if biases[0] is None else torch.cat(biases)
            return torch.cat([l.weight for l in linears]), bias
        self._fused = [{"qkv": cat(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj),
                        "gate_up": cat(l.mlp.gate_proj, l.mlp.up_proj)} for l in self.model.layers]

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None, expand: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (after the final norm), [B, T, hidden]. For packed input pass
        input_ids [1, N] and cu_seqlens [num_seqs + 1]; positions restart in each sequence. With
        expand (PackedLayout) the sequences are input_ids[0, expand], their shared prompts held
        once in input_ids, and the hidden states come out per input token."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        B, T = input_ids.shape
        if expand is not None and cu_seqlens is None:
            raise ValueError("expand needs cu_seqlens: it lays packed sequences out")
        packed = None if cu_seqlens is None else PackedLayout(cu_seqlens, expand, T)
        if position_ids is None:
            if packed is not None:
                position_ids = packed.input_positions().unsqueeze(0)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, packed, use_reentrant=False)
            else:
                x = layer(x, cos, sin, packed)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (for evaluation and tests; training uses hidden_states with the
        fused log-prob kernel so the logits never exist)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, cu_seqlens))

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       slots: torch.Tensor | None, length: int | None = None) -> torch.Tensor:
        """Runs tokens [B, T] at `positions` [B, T] of cache rows `slots` [B] (None: rows 0..B-1),
        writing their keys and values; returns hidden states [B, T, hidden]. Queries attend to
        the first `length` cache positions (default: up to the largest position; more only adds
        masked keys)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        step = CachedStep(cache, slots, positions, self._fused, length)
        for layer in self.model.layers:
            x = layer(x, cos, sin, None, step)
        return self.model.norm(x)


def packed_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[0, 1, .., n0-1, 0, 1, .., n1-1, ...] for sequence boundaries cu_seqlens."""
    return PackedLayout(cu_seqlens).positions()

"""Model configuration, read from and written to a Hugging Face config.json (Qwen2 and Llama)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SUPPORTED = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "linear" | "llama3", ...} or None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False               # Qwen2: always; Llama: attention_bias
    o_bias: bool = False                 # Llama attention_bias also covers o_proj
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # other keys, written back unchanged

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported architecture {model_type!r} (architectures="
                             f"{d.get('architectures')}); rci_fast supports {sorted(SUPPORTED)}")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # the same function
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        # transformers >= 5 keeps rope settings in rope_parameters; older files use
        # rope_theta + rope_scaling at the top level. A file with both (rci_fast writes both) must
        # say the same in each: transformers 5 reads rope_scaling first, rci_fast would not.
        params, scaling = d.get("rope_parameters") or {}, d.get("rope_scaling") or {}
        top_theta = d.get("rope_theta", 10000.0)
        if params and scaling and (_rope_fields(params) != _rope_fields(scaling) or
                                   params.get("rope_theta", top_theta) != scaling.get("rope_theta", top_theta)):
            raise ValueError(f"config.json's rope_scaling {scaling} and rope_parameters {params} disagree"
                             f" (rope_theta {top_theta})")
        rope = dict(params or scaling)
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r} (default, linear, llama3)")
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if partial is not None and partial != 1.0:
            raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE on the whole head only)")
        if rope_type == "llama3":  # transformers' default for a file without it
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
        heads = d["num_attention_heads"]
        attention_bias = bool(d.get("attention_bias", False))
        known = {f for f in cls.__dataclass_fields__ if f != "extra"} | {
            "rope_parameters", "attention_bias", "hidden_act", "architectures", "use_sliding_window",
            "partial_rotary_factor", "dtype", "torch_dtype"}  # the dtypes: save_pretrained writes its own
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf(self) -> dict:
        d = {k: v for k, v in asdict(self).items()
             if k not in ("extra", "qkv_bias", "o_bias", "rope_theta", "rope_scaling")}
        d.update(self.extra)
        d["architectures"] = [SUPPORTED[self.model_type]]
        d["hidden_act"] = "silu"
        # Both spellings, so that transformers 4.x and 5.x read the same rope settings.
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = self.rope_scaling
        d["rope_parameters"] = {"rope_theta": self.rope_theta,
                                **(self.rope_scaling or {"rope_type": "default"})}
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
        return d

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


def _rope_fields(rope: dict) -> dict:
    """A rope dict less its theta, with its type under one name (older files say "type")."""
    fields = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
    fields["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return fields

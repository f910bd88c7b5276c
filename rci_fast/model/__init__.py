"""rci_fast.model: Qwen2/Llama decoder, KV cache, Hugging Face checkpoint I/O.

    from rci_fast.model import load_pretrained
    m = load_pretrained(path, dtype=torch.float32, device="cpu")
    logits = m(input_ids)                 # [B, T, V]
    h = m.hidden_states(input_ids)        # for fused_linear_logprob(h, m.lm_head.weight, ...)
    m.save_pretrained(out_dir)            # transformers loads it
"""
from rci_fast.model.checkpoint import load_pretrained, save_pretrained
from rci_fast.model.config import ModelConfig
from rci_fast.model.transformer import KVCache, Transformer, packed_positions

__all__ = ["load_pretrained", "save_pretrained", "ModelConfig", "Transformer", "KVCache",
           "packed_positions"]

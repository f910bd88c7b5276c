"""The copying warm-up of the demo's base model (rci_fast/train/warmup.py)."""
import pytest
import torch
from transformers import AutoTokenizer

from rci_fast.model import load_pretrained
from rci_fast.tokenizer import train_bpe_tokenizer
from rci_fast.train.warmup import copy_sequence, copy_warmup, prefix_phase_starts


@pytest.mark.parametrize("max_prefix", [0, 48])
def test_copy_sequence_repeats_its_span_and_trains_only_the_repeat(max_prefix):
    gen = torch.Generator().manual_seed(0)
    token_ids, digit_ids = torch.arange(10, 500), torch.arange(10, 20)
    starts = set()
    for _ in range(50):
        s = copy_sequence(gen, token_ids, digit_ids, max_prefix=max_prefix)
        n = int(s.trainable.sum()) + 1  # the repeat's first token is not trained
        span = s.input_ids[-n:]
        assert 4 <= n <= 24 and not s.trainable[:-n + 1].any() and s.trainable[-n + 1:].all()
        # the span occurs earlier, right at the start when there is no prefix
        found = [i for i in range(len(s.input_ids) - 2 * n + 1) if torch.equal(s.input_ids[i:i + n], span)]
        assert found and (max_prefix or found[0] == 0)
        starts.add(found[0])
        assert ((s.input_ids >= 10) & (s.input_ids < 500)).all()
    assert (len(starts) > 10) == bool(max_prefix)


def test_the_prefix_phase_waits_until_the_model_copies():
    copying, plateau = [4.5] * 50 + [0.6] * 50, [4.5] * 100
    assert not prefix_phase_starts(99, 240, copying)        # before half the steps
    assert prefix_phase_starts(120, 240, copying)
    assert not prefix_phase_starts(120, 240, plateau)       # still on the plateau at half time
    assert prefix_phase_starts(180, 240, plateau)           # three quarters: regardless


def test_copy_warmup_lowers_the_copy_loss_and_writes_a_loadable_model(tmp_path):
    from rci_fast.model import ModelConfig, Transformer, save_pretrained

    tok = train_bpe_tokenizer(["the answer is 12345 and 678, then 90 more words here"] * 50, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=True, qkv_bias=True)
    save_pretrained(Transformer(cfg), str(tmp_path / "init"))
    tok.save_pretrained(str(tmp_path / "init"))
    losses = copy_warmup(str(tmp_path / "init"), str(tmp_path / "base"), steps=40, batch_size=8, lr=3e-3)
    assert len(losses) == 40 and sum(losses[-10:]) < sum(losses[:10])
    trained, init = load_pretrained(str(tmp_path / "base")), load_pretrained(str(tmp_path / "init"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "base")).vocab_size == tok.vocab_size
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), init.parameters())]
    assert all(changed)

"""A small byte-level BPE tokenizer trained locally (nothing is downloaded from a hub)."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe_tokenizer(texts, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` (an iterable of str): any text, including interpreter output,
    encodes without unknown tokens. EOS is <|endoftext|>.

    Runs of digits are split off from the text around them (as Qwen2.5's tokenizer does, which
    goes further and splits every digit): a number is then the same tokens after a space, a
    bracket or a newline, so copying it (from the question into code, from the interpreter's
    output into the answer) is plain token copying."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")

"""A copying warm-up for a randomly initialised tiny model: the stand-in for pretraining.

The recipe starts from a pretrained LLM, which copies text from its context without effort (an
"induction head"). A random tiny model does not, and multi-turn SFT alone (where copying is a few
tokens per trajectory: numbers from the question into code, the interpreter's output into the
answer) does not teach it within a CPU budget. Dense copying of random tokens does, after a
plateau of about a thousand steps: each sequence is a random span, random tokens, then the span
again, and only the repeat is trained. Half the spans are digits only, so the model also learns
to copy when a token repeats inside the span (it must match more than the previous token). No
task data is used: the warm-up teaches copying, nothing about the tasks.

In the first half the span opens the sequence, which lets the copying form quickly, but the model
then finds the span by its position: it copied a 6-10 digit number from the middle of a question
at 46% of tokens. In the second half random tokens come before the span too, which brings that to
99% (95% of numbers exact). Random tokens before the span from the start never left the plateau
in 2,400 steps, and switching before the model has left it sets it back (a seed still on the
plateau at half time ended at a copy loss of 0.79 instead of 0.1): the switch waits until the
mean loss of the last 50 steps is below LEFT_PLATEAU_LOSS, at three quarters of the steps at the
latest.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from rci_fast.model import load_pretrained
from rci_fast.train.data import TokenizedSequence, pack
from rci_fast.train.model_source import write_model_folder
from rci_fast.train.modeling import TokenLogprobs
from rci_fast.train.sft import lr_factor

log = logging.getLogger("rci_fast.warmup")

LEFT_PLATEAU_LOSS = 1.5  # nats per copied token; ~4.5 on the plateau, ~0.1 when copying works


def copy_sequence(gen: torch.Generator, token_ids: torch.Tensor, digit_ids: torch.Tensor, max_span: int = 24,
                  max_gap: int = 48, max_prefix: int = 0) -> TokenizedSequence:
    """prefix, span, gap, span again: the span drawn from digit_ids or token_ids (half each), the
    rest from token_ids; the repeat is trained from its second token on (its first one cannot be
    known)."""
    span = int(torch.randint(4, max_span + 1, (), generator=gen))
    gap = int(torch.randint(0, max_gap + 1, (), generator=gen))
    prefix = int(torch.randint(0, max_prefix + 1, (), generator=gen))

    def draw(pool, n):
        return pool[torch.randint(0, len(pool), (n,), generator=gen)]

    first = draw(digit_ids if torch.rand((), generator=gen) < 0.5 else token_ids, span)
    ids = torch.cat([draw(token_ids, prefix), first, draw(token_ids, gap), first])
    trainable = torch.zeros(len(ids), dtype=torch.bool)
    trainable[prefix + span + gap + 1:] = True
    return TokenizedSequence(ids, trainable)


def prefix_phase_starts(step: int, steps: int, losses: list[float]) -> bool:
    """Whether random tokens go before the span from `step` on (module doc): from half the steps,
    once the last 50 steps' mean loss shows the model copies, and at three quarters regardless."""
    if step < steps // 2:
        return False
    recent = losses[-50:]
    return step >= 3 * steps // 4 or sum(recent) / len(recent) < LEFT_PLATEAU_LOSS


def copy_warmup(model_dir: str, out_dir: str, steps: int, seed: int = 0, batch_size: int = 32,
                lr: float = 1e-3, warmup_steps: int = 20) -> list[float]:
    """Trains the model of model_dir (HF folder with tokenizer) on copying random tokens and
    writes it to out_dir (atomically). Returns the loss per step. (lr: 3e-3 never left the
    plateau in 2,500 steps on the demo's model; 1e-3 does after ~1,000. A schedule over 1,600 steps
    decays the rate while the model leaves the plateau and stops at a copy loss of 0.75; over
    2,400 the loss reaches 0.1.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_pretrained(model_dir, dtype=torch.float32)
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)  # <|im_end|> etc.
    token_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lm = TokenLogprobs(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, prefixed = [], False
    bar = tqdm(range(steps), desc="copy warm-up", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup_steps, "cosine", 0.1)
        if not prefixed and prefix_phase_starts(step, steps, losses):
            prefixed = True
            log.info("copy warm-up: random tokens before the span from step %d on", step)
        max_prefix = 48 if prefixed else 0  # module doc: position first, then anywhere
        batch = pack([copy_sequence(gen, token_ids, digit_ids, max_prefix=max_prefix) for _ in range(batch_size)])
        logp = lm(batch.input_ids, batch.targets, batch.cu_seqlens)
        loss = -logp.sum() / batch.num_trained
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    write_model_folder(model, tokenizer, Path(out_dir))
    return losses

"""SFT data: trajectories -> token ids + loss mask -> packed micro-batches, in a seeded order.

Token contract: each (kind, text, trainable) segment of `conversation_segments` is tokenized on
its own and the ids are concatenated; decoded text is never re-tokenized; interpreter output
keeps special tokens' text as plain text, as in rollouts. Only model segments
are trained (the assistant's words and code, and the closing <|im_end|>); the prompt and the
interpreter's output are context.

Order: a global batch is `batch_size` trajectories of a seeded permutation per epoch; every rank
computes the same plan, takes its share (balanced by tokens) and packs it into micro-batches of
at most `micro_batch_tokens` tokens, sequences back to back with cu_seqlens (no padding). The
position in the data is (epoch, batch index): a checkpoint stores it and the order resumes exactly.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math

import torch

from rci_fast.tasks.prompt import conversation_segments, render_chat
from rci_fast.tasks.trajectory import SFTTrajectory

IGNORE = -100  # target id that fused_linear_logprob skips (no log-prob, no gradient)
log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizedSequence:
    input_ids: torch.Tensor   # [n] int64
    trainable: torch.Tensor   # [n] bool: token i is model output (its prediction is trained)

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_trained(self) -> int:
        """Tokens whose prediction is trained; the first token has no context and never is."""
        return int(self.trainable[1:].sum())


def checked_segments(messages: list[dict], tokenizer, check_template: bool = True) -> list[tuple[str, str, bool]]:
    """conversation_segments(messages); with check_template and a tokenizer that has a chat
    template, their text must equal the template's rendering, so training sees what inference will."""
    segments = conversation_segments(messages)
    if check_template and getattr(tokenizer, "chat_template", None):
        rendered = render_chat(messages, tokenizer)
        joined = "".join(text for _, text, _ in segments)
        if rendered != joined:
            at = next((i for i, (a, b) in enumerate(zip(rendered, joined)) if a != b), min(len(rendered), len(joined)))
            raise ValueError(f"the tokenizer's chat template renders this conversation differently from "
                             f"rci_fast's ChatML segments at character {at}: template "
                             f"{rendered[max(0, at - 40):at + 40]!r} vs segments "
                             f"{joined[max(0, at - 40):at + 40]!r} (set data.check_chat_template=false "
                             "to train on the segments anyway)")
    return segments


def _assemble(segments, pieces: list[list[int]]) -> TokenizedSequence:
    ids = torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.long)
    flags = torch.tensor([is_trained for _, _, is_trained in segments], dtype=torch.bool)
    trainable = torch.repeat_interleave(flags, torch.tensor([len(p) for p in pieces], dtype=torch.long))
    return TokenizedSequence(ids, trainable)


def encode_segments(segments, tokenizer) -> list[list[int]]:
    """Each segment's ids, in batched tokenizer calls. Interpreter output has any special token's
    text split into plain tokens, as the rollout engine forces it: printed '<|im_end|>' is text."""
    is_tool = [kind == "tool" for kind, _, _ in segments]
    plain = [text for (_, text, _), tool in zip(segments, is_tool) if not tool]
    split = [text for (_, text, _), tool in zip(segments, is_tool) if tool]
    plain_ids = iter(tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
    split_ids = iter(tokenizer(split, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                     if split else [])
    return [next(split_ids) if tool else next(plain_ids) for tool in is_tool]


def tokenize_conversation(messages: list[dict], tokenizer, check_template: bool = True) -> TokenizedSequence:
    """Ids and trainable mask of a conversation, each segment tokenized on its own (module doc)."""
    segments = checked_segments(messages, tokenizer, check_template)
    return _assemble(segments, encode_segments(segments, tokenizer))


def tokenize_trajectories(trajectories: list[SFTTrajectory], tokenizer, *, max_seq_len: int = 0,
                          min_score: float | None = None, check_template: bool = True,
                          source: str = "data") -> list[TokenizedSequence]:
    """tokenize_conversation over a data set, with every segment of every trajectory encoded in
    one batched tokenizer call (the fast tokenizers encode batches in parallel, in Rust)."""
    kept, dropped_score = [], 0
    for i, t in enumerate(trajectories):
        if min_score is not None and (t.score is None or t.score < min_score):
            dropped_score += 1
            continue
        try:
            kept.append(checked_segments(t.messages, tokenizer, check_template))
        except ValueError as e:
            raise ValueError(f"{source}: trajectory {i + 1}: {e}") from None
    encoded = encode_segments([segment for segments in kept for segment in segments], tokenizer)
    out, start, dropped_long = [], 0, 0
    for segments in kept:
        seq = _assemble(segments, encoded[start:start + len(segments)])
        start += len(segments)
        if max_seq_len and len(seq) > max_seq_len:
            dropped_long += 1
            continue
        out.append(seq)
    if dropped_long or dropped_score:
        log.warning("%s: dropped %d trajectories longer than data.max_seq_len=%d and %d below "
                    "data.min_score", source, dropped_long, max_seq_len, dropped_score)
    if not out:
        raise ValueError(f"{source}: no trajectory left to train on ({len(trajectories)} read, "
                         f"{dropped_long} too long, {dropped_score} below min_score)")
    return out


@dataclasses.dataclass
class MicroBatch:
    """Sequences packed back to back: input_ids [1, N], targets [N] (IGNORE where not trained,
    and at each sequence's last token so nothing is predicted across a boundary), cu_seqlens.
    With shared prompts (pack_shared_prompts) input_ids holds each distinct prompt once and the
    sequences are input_ids[0, expand]: targets and cu_seqlens describe them."""
    input_ids: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    num_trained: int
    expand: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.targets.shape[0]

    def to(self, device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.targets), move(self.cu_seqlens), self.num_trained,
                          move(self.expand))


def shifted_targets(seq: TokenizedSequence) -> torch.Tensor:
    """targets[i] = input_ids[i + 1] where that token is trained, else IGNORE; the last is IGNORE."""
    targets = torch.full_like(seq.input_ids, IGNORE)
    targets[:-1] = torch.where(seq.trainable[1:], seq.input_ids[1:], IGNORE)
    return targets


def pack(sequences: list[TokenizedSequence]) -> MicroBatch:
    if not sequences:  # a rank with no sequence this step still runs one forward (FSDP collectives)
        return MicroBatch(torch.zeros(1, 1, dtype=torch.long), torch.full((1,), IGNORE),
                          torch.tensor([0, 1], dtype=torch.int32), 0)
    lengths = torch.tensor([0] + [len(s) for s in sequences])
    return MicroBatch(torch.cat([s.input_ids for s in sequences]).unsqueeze(0),
                      torch.cat([shifted_targets(s) for s in sequences]),
                      lengths.cumsum(0).to(torch.int32), sum(s.num_trained for s in sequences))


def pack_shared_prompts(sequences: list[TokenizedSequence], prompt_lens: list[int]) -> MicroBatch:
    """pack(), with each distinct prompt (the first prompt_lens[i] tokens of sequence i) held once
    in input_ids: a GRPO group's prompt then goes through the model's per-token layers once
    (Transformer.hidden_states with expand), not once per completion."""
    batch = pack(sequences)
    if not sequences:
        return batch
    pieces, places, held, offset = [], [], {}, 0
    for seq, n in zip(sequences, prompt_lens):
        key = tuple(seq.input_ids[:n].tolist())
        own = seq.input_ids
        if n > 0 and key in held:
            places.append(torch.arange(held[key], held[key] + n))
            own = seq.input_ids[n:]
        elif n > 0:
            held[key] = offset
        pieces.append(own)
        places.append(torch.arange(offset, offset + len(own)))
        offset += len(own)
    return dataclasses.replace(batch, input_ids=torch.cat(pieces).unsqueeze(0), expand=torch.cat(places))


def split_by_budget(sequences: list[TokenizedSequence], budget: int) -> list[list[TokenizedSequence]]:
    """Consecutive groups of at most `budget` tokens each (order kept, so results are reproducible)."""
    groups: list[list[TokenizedSequence]] = []
    current, used = [], 0
    for s in sequences:
        if current and used + len(s) > budget:
            groups.append(current)
            current, used = [], 0
        current.append(s)
        used += len(s)
    return groups + [current] if current else groups


class SFTBatches:
    """The seeded, rank-sharded, resumable order of packed micro-batches."""

    def __init__(self, sequences: list[TokenizedSequence], batch_size: int, micro_batch_tokens: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        longest = max(len(s) for s in sequences)
        if longest > micro_batch_tokens:
            raise ValueError(f"impossible token budget: a trajectory has {longest} tokens but "
                             f"train.micro_batch_tokens is {micro_batch_tokens} (raise it, or drop long "
                             f"trajectories with data.max_seq_len)")
        self.sequences, self.batch_size, self.budget = sequences, batch_size, micro_batch_tokens
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = math.ceil(len(sequences) / batch_size)  # the last batch may be smaller

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.sequences), generator=g).tolist()

    def global_batch(self, epoch: int, index: int) -> list[int]:
        """Indices of the trajectories in batch `index` of `epoch` (the same on every rank)."""
        return self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

    def rank_share(self, batch: list[int]) -> list[list[int]]:
        """Each rank's indices: longest first to the rank with the fewest tokens (ties: lower rank)."""
        shares: list[list[int]] = [[] for _ in range(self.world_size)]
        loads = [0] * self.world_size
        for i in sorted(batch, key=lambda j: (-len(self.sequences[j]), j)):
            r = min(range(self.world_size), key=lambda k: (loads[k], k))
            shares[r].append(i)
            loads[r] += len(self.sequences[i])
        return shares

    def micro_batches(self, epoch: int, index: int) -> list[MicroBatch]:
        """This rank's packed micro-batches for one optimizer step. Every rank returns the same
        number (short ranks get an empty one-token micro-batch), since each forward under FSDP is
        a collective; the split of every rank is computed locally from the same plan."""
        shares = self.rank_share(self.global_batch(epoch, index))
        groups = [split_by_budget([self.sequences[i] for i in sorted(share)], self.budget) for share in shares]
        count = max(1, max(len(g) for g in groups))
        mine = groups[self.rank]
        return [pack(mine[k]) if k < len(mine) else pack([]) for k in range(count)]

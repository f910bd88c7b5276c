"""Batched rollouts with a KV cache that run the model's code while the other sequences decode.

Each sequence lives in a cache slot. A decode step advances every sequence that is not waiting for
the interpreter. When a sequence closes a ```python block, its code goes to the sandbox
(non-blocking) and the sequence leaves the decode batch; when the result arrives, the interpreter's
output is tokenized once and pushed through the cache as forced, not-trainable tokens (no
re-prefill of the history) and the sequence rejoins the batch: as soon as the result is there
(fastest; which rows share a step, and so the random number each row draws and the batch size
each GEMM sees, then depend on the sandbox's timing), or, with result_delay_steps = k, exactly k
decode steps after the block closed, waiting for a late result: fixed seeds then give the same
trajectories to the bit, on any machine speed. Finished sequences free their slot
for the next prompt. A prompt repeated in the batch (a GRPO group) is prefilled once: its twins
copy its keys and values. On a CPU, float32 decode steps run in C++ (model/cpu_decode.py).

Token in, token out: the ids that were sampled are the ids returned, with a mask per the token
contract (DESIGN.md): prompt and interpreter output are not trainable, model text is.
"""
from __future__ import annotations

import concurrent.futures
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from rci_fast.model import KVCache, Transformer
from rci_fast.model.cpu_decode import CpuDecodeStep
from rci_fast.rollout.decode_graphs import DecodeGraphs
from rci_fast.rollout.sampling import SamplingParams, sample
from rci_fast.tasks.answer import answer_state
from rci_fast.tasks.prompt import DEFAULT_MAX_RESULT_CHARS, format_result

CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.S)
DEFAULT_TOOL_TEMPLATE = "\n{result}\n"  # around tasks.prompt.format_result: the SFT data's format


@dataclass
class Segment:
    kind: str          # "prompt", "model" or "tool"
    ids: list[int]
    trainable: bool


@dataclass
class Trajectory:
    prompt_index: int
    segments: list[Segment]
    logprobs: list[float]            # aligned with token_ids; 0.0 where nothing was sampled
    text: str                        # everything after the prompt, decoded
    code_statuses: list[str]         # sandbox status of each code call, in order
    finish_reason: str               # eos | answer | stop | length | max_total
    code_wall_ms: list[float] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.ids]

    @property
    def trainable_mask(self) -> list[bool]:
        return [s.trainable for s in self.segments for _ in s.ids]

    @property
    def num_code_calls(self) -> int:
        return len(self.code_statuses)


class _Seq:
    def __init__(self, index: int, prompt: list[int], slot: int):
        self.index, self.slot = index, slot
        self.prompt = tuple(prompt)
        self.segments = [Segment("prompt", list(prompt), False)]
        self.logprobs = [0.0] * len(prompt)
        self.length = 0            # tokens whose keys/values are in the cache
        # The C++ step reads cache positions below prefix_len from slot prefix_slot: a twin's
        # copy of the same prompt, read by the whole group from cache (CpuDecodeStep).
        self.prefix_slot, self.prefix_len = slot, 0
        self.next_input: list[int] = []  # tokens to push through the cache at the next step
        self.new_tokens = 0
        self.code_statuses: list[str] = []
        self.code_wall_ms: list[float] = []
        self.future: concurrent.futures.Future | None = None
        self.result_step = 0       # with result_delay_steps: the decode step its result rejoins at
        self.answer_at_end = False  # the text ends with an answer's '>>>': a next '>' still belongs to it
        self.finish_reason = ""

    @property
    def total(self) -> int:
        return len(self.logprobs)  # one per token of every segment

    def add_model_token(self, token: int, logprob: float) -> None:
        if self.segments[-1].kind != "model":
            self.segments.append(Segment("model", [], True))
        self.segments[-1].ids.append(token)
        self.logprobs.append(logprob)
        self.next_input.append(token)
        self.new_tokens += 1


class RolloutEngine:
    """Generates multi-turn trajectories with code execution.

    model: rci_fast Transformer; tokenizer: a transformers tokenizer (encode/decode);
    sandbox: rci_fast.sandbox.Sandbox or None (then code blocks are not executed);
    logits_processor(segments_per_row, logits [B, V]) -> logits: a hook that can steer sampling
    (tests use it to script a policy);
    cuda_graphs: run decode steps as CUDA graphs (rollout/decode_graphs.py; "eager" runs the same
    static all-slot step without graphs, on any device);
    cpu_decode: run one-token-per-row steps of a float32 model on a CPU in C++
    (model/cpu_decode.py): None uses it where it applies and builds, True insists, False never;
    result_delay_steps: 0 feeds a code result back at the first step after it arrives; k > 0
    exactly k decode steps after its block closed (waiting for it if it is late), which makes
    runs with code calls repeatable to the bit (module doc).
    One generate call at a time per engine (it keeps per-call state, and on a CPU its KV cache
    between calls): threads that roll out at once need an engine each."""

    def __init__(self, model: Transformer, tokenizer, sandbox=None, *, max_batch: int = 64,
                 max_code_calls: int = 8, code_timeout_s: float = 10.0,
                 max_tool_output_chars: int = DEFAULT_MAX_RESULT_CHARS,
                 tool_template: str = DEFAULT_TOOL_TEMPLATE,
                 eos_ids: list[int] | None = None,
                 logits_processor: Callable[[list[list[Segment]], torch.Tensor], torch.Tensor] | None = None,
                 cuda_graphs: bool | str = False, cpu_decode: bool | None = None,
                 result_delay_steps: int = 0):
        self.model, self.tokenizer, self.sandbox = model, tokenizer, sandbox
        if result_delay_steps < 0:
            raise ValueError(f"result_delay_steps must be >= 0, got {result_delay_steps}")
        self.result_delay_steps = result_delay_steps
        self.max_batch, self.max_code_calls = max_batch, max_code_calls
        self.code_timeout_s, self.max_tool_output_chars = code_timeout_s, max_tool_output_chars
        self.tool_template = tool_template
        if eos_ids is None:  # the model's, else the tokenizer's; [] means: never stop on EOS
            eos_ids = model.config.eos_ids or [t for t in [tokenizer.eos_token_id] if t is not None]
        self.eos_ids = set(eos_ids)
        self.logits_processor = logits_processor
        if cuda_graphs not in (False, True, "eager"):
            raise ValueError(f"cuda_graphs must be False, True or 'eager', got {cuda_graphs!r}")
        if cuda_graphs is True and model.lm_head.weight.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = cuda_graphs
        if cpu_decode and not CpuDecodeStep.supports(model):
            raise ValueError("cpu_decode=True needs a float32 model on a CPU")
        self.cpu_decode = cpu_decode
        self._graphs: DecodeGraphs | None = None
        self._kept_cache: KVCache | None = None  # on a CPU, reused by the next generate (_kv_cache)
        self._piece_cache: dict[int, str] = {}
        self.stats: dict[str, float] = {}

    # ---- public ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Trajectory]:
        """One trajectory per prompt (token ids), in prompt order."""
        if any(len(p) == 0 or len(p) >= params.max_total_tokens for p in prompts):
            raise ValueError("every prompt must hold at least one token and fewer than "
                             f"max_total_tokens={params.max_total_tokens}")
        device = self.model.lm_head.weight.device
        dtype = self.model.lm_head.weight.dtype
        self._cpu_step = None
        cpu_step_fits = not self.cuda_graphs and CpuDecodeStep.supports(self.model)
        if self.cpu_decode and not cpu_step_fits:
            raise ValueError("cpu_decode=True needs a float32 model on a CPU and no cuda_graphs")
        if self.cpu_decode is not False and cpu_step_fits and (self.cpu_decode or CpuDecodeStep.available()):
            self._cpu_step = CpuDecodeStep(self.model)  # True: a failed build raises here
        else:
            self.model.fuse_projections()  # from the weights as they are now (CpuDecodeStep does it too)
        try:
            return self._generate(prompts, params, device, dtype)
        finally:
            self._cpu_step = None  # its packed weight copies are stale after the next update
            self._graphs = None  # its graphs hold this call's KV cache: freed before the update

    def _generate(self, prompts, params, device, dtype) -> list[Trajectory]:
        """generate's loop: slots refilled from the queue, tool results collected, one step."""
        n_slots = min(self.max_batch, len(prompts))
        # One spare column past max_total_tokens takes the padding's writes (see _advance).
        cache = self._kv_cache(n_slots, params.max_total_tokens + 1, dtype, device)
        self._graphs = (DecodeGraphs(self.model, cache, n_slots, capture=self.cuda_graphs is True)
                        if self.cuda_graphs else None)
        generator = torch.Generator(device=device).manual_seed(params.seed)
        self._trigger_chars = set("`>") | {s[-1] for s in params.stop if s}
        self._trigger_of: dict[int, bool] = {}  # token -> _is_trigger, for this call's stops
        # A stop ending in a non-ASCII or blank character may end inside a token whose own text
        # does not show it (a byte-level piece of a multi-byte character decodes to U+FFFD, a
        # SentencePiece token alone loses its leading space): every token is checked then.
        self._trigger_always = any(s and (not s[-1].isascii() or s[-1].isspace()) for s in params.stop)
        queue = deque(enumerate(prompts))
        free = list(range(n_slots - 1, -1, -1))
        active: list[_Seq] = []
        done: dict[int, Trajectory] = {}
        t_start = time.perf_counter()
        step = 0  # decode steps so far: result_delay_steps's clock
        stats = {"forward_s": 0.0, "tool_wait_s": 0.0, "decode_steps": 0, "sampled_tokens": 0,
                 "shared_prompt_tokens": 0, "cpu_decode": self._cpu_step is not None}

        holders: dict[tuple[int, ...], _Seq] = {}  # a prompt -> a live sequence whose cache holds it
        while queue or active:
            while free and queue:  # refill free slots; the prompt itself is pushed at the next step
                index, prompt = queue.popleft()
                seq = _Seq(index, prompt, free.pop())
                seq.next_input = list(prompt)
                active.append(seq)
            step = self._collect_tool_results(active, params, step, stats)
            ready = self._share_prompts([s for s in active if s.future is None and s.next_input
                                         and not s.finish_reason],
                                        holders, cache, stats)
            if ready:
                t0 = time.perf_counter()
                logits = self._advance(ready, active, cache, device)
                stats["forward_s"] += time.perf_counter() - t0
                if self.logits_processor is not None:
                    logits = self.logits_processor([s.segments for s in ready], logits)
                ids, logps = sample(logits.float(), params, generator)
                step += 1
                stats["decode_steps"] += 1
                stats["sampled_tokens"] += len(ready)
                for seq, tok, lp in zip(ready, ids.tolist(), logps.tolist()):
                    seq.add_model_token(tok, lp)
                    self._after_token(seq, tok, params)
                    if seq.future is not None:  # its code was submitted just now
                        seq.result_step = step + self.result_delay_steps
            for seq in [s for s in active if s.finish_reason]:
                active.remove(seq)
                twin = None
                if holders.get(seq.prompt) is seq:  # hand the prompt to a live twin, if any
                    twin = next((s for s in active if s.prompt == seq.prompt and not s.finish_reason
                                 and s.length >= len(s.prompt)), None)
                    if twin is None:
                        del holders[seq.prompt]
                    else:
                        holders[seq.prompt] = twin
                for reader in active:  # the slot is reused: its readers read the twin's copy or their own
                    if reader.prefix_slot == seq.slot:
                        reader.prefix_slot = reader.slot if twin is None else twin.slot
                free.append(seq.slot)
                done[seq.index] = self._trajectory(seq)
        stats["total_s"] = time.perf_counter() - t_start
        self.stats = stats
        return [done[i] for i in range(len(prompts))]

    def _kv_cache(self, slots: int, max_len: int, dtype, device) -> KVCache:
        """The cache for one generate call. CUDA graphs hold the cache's addresses and replay no
        host code: a new one, zeroed up front. On a CPU the last call's is reused when its shape
        fits (zeroed again position by position as it fills): a new one's pages fault in on first
        touch, which cost ~4 ms of a 130 ms rollout of 16 x 212 tokens. It stays allocated
        between calls (on a GPU memory is scarcer and the update needs it: a new one each call)."""
        zero_all = self.cuda_graphs is True
        if torch.device(device).type != "cpu" or zero_all:
            return KVCache(self.model.config, slots, max_len, dtype, device, zero_all=zero_all)
        cfg, kept = self.model.config, self._kept_cache
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        if kept is None or kept.k.shape != shape or kept.k.dtype != dtype:
            self._kept_cache = None  # free the old one before the new one is allocated
            kept = self._kept_cache = KVCache(cfg, slots, max_len, dtype, device, zero_all=False)
        kept.zeroed = 0  # stale keys and values may be NaN (a diverged model's): zeroed before use
        return kept

    # ---- steps ----------------------------------------------------------------------------

    @staticmethod
    def _share_prompts(ready: list[_Seq], holders: dict, cache: KVCache, stats: dict) -> list[_Seq]:
        """Prefills each distinct prompt once (GRPO samples a group of completions per prompt).

        A new sequence whose prompt a live sequence already holds in its cache copies those keys
        and values but the last token's, and pushes that one token as a decode row (its logits are
        needed); one whose twin is being prefilled in this very step waits one step for it.
        Returns the sequences that run in this step."""
        running, starting = [], set()
        for seq in ready:
            if seq.length > 0:  # not a fresh prompt
                running.append(seq)
                continue
            holder = holders.get(seq.prompt)
            if holder is not None and holder.length >= len(seq.prompt):
                n = len(seq.prompt) - 1
                cache.k[:, seq.slot, :, :n] = cache.k[:, holder.slot, :, :n]
                cache.v[:, seq.slot, :, :n] = cache.v[:, holder.slot, :, :n]
                seq.length, seq.next_input = n, seq.next_input[n:]
                seq.prefix_slot, seq.prefix_len = holder.slot, n
                stats["shared_prompt_tokens"] += n
                running.append(seq)
            elif seq.prompt not in starting:  # the first of its prompt: prefilled now, then shared
                starting.add(seq.prompt)
                holders[seq.prompt] = seq
                running.append(seq)
        return running

    def _advance(self, ready: list[_Seq], active: list[_Seq], cache: KVCache, device) -> torch.Tensor:
        """Pushes each ready sequence's pending tokens through the cache; returns next-token logits.

        Plain decoding (one pending token) and longer inputs (a new prompt, interpreter output)
        run as two batched calls. Rows of the longer inputs are right-padded; a padding token at
        position p writes garbage into cache cell p past the row's end, which the row's later
        tokens overwrite before any query reads it (queries read only up to their own position).
        The decoding call covers a contiguous range of slots, so attention reads the cache as a
        view instead of gathering rows: slots in the range that wait for the interpreter (or are
        free) ride along as dummy rows, writing at their next position (or 0), the same way.
        """
        # Runs once per decode step: plain lists and one tensor per call (per-row Python and
        # tensor ops here cost as much as a small model's step on a CPU, and stall a GPU's).
        outs = []
        single = [s for s in ready if len(s.next_input) == 1]
        multi = [s for s in ready if len(s.next_input) > 1]
        lo = n_single = 0
        if single:
            if self._graphs is not None:  # static shapes: every slot, every step
                lo, hi = 0, self._graphs.ids.shape[0] - 1
            else:
                slots = [s.slot for s in single]
                lo, hi = min(slots), max(slots)
            n_single = hi - lo + 1
            by_slot = {s.slot: s for s in active}
            rows = [by_slot.get(slot) for slot in range(lo, hi + 1)]
            tokens = [0] * n_single
            for s in single:
                tokens[s.slot - lo] = s.next_input[0]
            positions = [s.length if s else 0 for s in rows]
            if self._graphs is not None:
                outs.append(self._graphs.run(tokens, positions))
            elif self._cpu_step is not None:
                prefix_slots = [s.prefix_slot if s else lo + j for j, s in enumerate(rows)]
                prefix_lens = [s.prefix_len if s else 0 for s in rows]
                step = torch.tensor([tokens, positions, prefix_slots, prefix_lens])
                outs.append(self._cpu_step(step[0], step[1], lo, cache, step[2:], max(positions)))
            else:
                outs.append(self._forward_rows([[t] for t in tokens], [[p] for p in positions],
                                               list(range(lo, hi + 1)), [0] * n_single, cache, device))
        if multi:
            width = max(len(s.next_input) for s in multi)
            tokens = [s.next_input + [0] * (width - len(s.next_input)) for s in multi]
            positions = [[min(s.length + t, cache.max_len - 1) for t in range(width)] for s in multi]
            outs.append(self._forward_rows(tokens, positions, [s.slot for s in multi],
                                           [len(s.next_input) - 1 for s in multi], cache, device))
        # Each ready sequence's row in torch.cat(outs): its slot's in the decoding call, then the
        # longer inputs in order.
        multi_row = {id(s): n_single + j for j, s in enumerate(multi)}
        order = [multi_row[id(s)] if len(s.next_input) > 1 else s.slot - lo for s in ready]
        for s in ready:
            s.length += len(s.next_input)
            s.next_input = []
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if self._graphs is None and order == list(range(len(out))):
            return out  # plain decoding of slots in order: the rows are already the ready ones
        # One gather (a copy: a CUDA graph's output buffer is overwritten by the next replay).
        return out[torch.tensor(order, device=out.device)]

    def _forward_rows(self, tokens, positions, slots, last, cache, device) -> torch.Tensor:
        """One cached forward over rows built as Python lists (one tensor each: per-row tensor
        ops cost more than the model at small sizes); logits at each row's `last` index."""
        h = self.model.forward_cached(torch.tensor(tokens, device=device),
                                      torch.tensor(positions, device=device), cache,
                                      torch.tensor(slots, device=device))
        if h.shape[1] == 1:  # one token per row: no gather
            return self.model.lm_head(h[:, 0])
        rows = torch.arange(len(tokens), device=device)
        return self.model.lm_head(h[rows, torch.tensor(last, device=device)])

    def _piece(self, token: int) -> str:
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._piece_cache[token] = self.tokenizer.decode([token])
        return piece

    def _is_trigger(self, token: int) -> bool:
        """Whether the token's text holds a character that may end a code block, an answer or a
        stop string (then the segment's text is looked at)."""
        if self._trigger_always:
            return True
        hit = self._trigger_of.get(token)
        if hit is None:
            hit = self._trigger_of[token] = not self._trigger_chars.isdisjoint(self._piece(token))
        return hit

    def _after_token(self, seq: _Seq, token: int, params: SamplingParams) -> None:
        if token in self.eos_ids:
            seq.finish_reason = "eos"
        elif seq.new_tokens >= params.max_new_tokens:
            seq.finish_reason = "length"
        elif seq.total >= params.max_total_tokens:
            seq.finish_reason = "max_total"
        elif seq.answer_at_end or self._is_trigger(token):
            # Only now is the segment's text needed: decoding it every step would cost O(n^2).
            text = self.tokenizer.decode(seq.segments[-1].ids)
            block = CODE_BLOCK.search(text)
            seq.answer_at_end = False
            if block and self.sandbox is not None and len(seq.code_statuses) < self.max_code_calls:
                seq.future = self.sandbox.submit(block.group(1), timeout_s=self.code_timeout_s)
            elif params.stop_at_answer and (state := answer_state(text)):
                # The answer as the reward reads it (tasks.answer: outside code blocks, and
                # '<<<] >>>>' is '] >'): one that ends the text may still take a '>' from the next
                # token, so it ends the episode once a token follows (or at EOS).
                if state == "closed":
                    seq.finish_reason = "answer"
                else:
                    seq.answer_at_end = True
            elif any(s and s in text for s in params.stop):
                seq.finish_reason = "stop"

    def _collect_tool_results(self, active: list[_Seq], params: SamplingParams, step: int,
                              stats: dict) -> int:
        """Feeds finished code results back (as pending forced tokens); returns the step clock,
        which jumps ahead to the next due result when every sequence waits for one."""
        pending = [s for s in active if s.future is not None]
        if not pending:
            return step
        idle = len(pending) == len(active)  # nothing can decode until some result is back
        t0 = time.perf_counter()
        if self.result_delay_steps:  # the schedule alone decides, not the sandbox's timing
            if idle:
                step = max(step, min(s.result_step for s in pending))
            pending = [s for s in pending if s.result_step <= step]
            concurrent.futures.wait([s.future for s in pending])  # late ones stall the batch
        elif idle:
            concurrent.futures.wait([s.future for s in pending],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        stats["tool_wait_s"] += time.perf_counter() - t0
        for seq in pending:
            if not seq.future.done():
                continue
            result = seq.future.result()
            seq.future = None
            seq.code_statuses.append(result.status)
            seq.code_wall_ms.append(result.wall_ms)
            # A special token's text in the output stays text: code that prints "<|im_end|>" must
            # not end the turn or the episode from inside the interpreter's output.
            forced = self.tokenizer(self.format_tool_output(result), add_special_tokens=False,
                                    split_special_tokens=True).input_ids
            room = params.max_total_tokens - seq.total
            if len(forced) >= room:  # no room left to answer after the output
                seq.segments.append(Segment("tool", forced[:room], False))
                seq.logprobs.extend([0.0] * min(len(forced), room))
                seq.finish_reason = "max_total"
                continue
            seq.segments.append(Segment("tool", forced, False))
            seq.logprobs.extend([0.0] * len(forced))
            seq.next_input.extend(forced)
        return step

    def format_tool_output(self, result) -> str:
        """The forced text after a code block: "Code Execution Results:" and the output, cut to
        max_tool_output_chars, in the tool template (the same text SFT trajectories hold)."""
        return self.tool_template.format(result=format_result(
            result.stdout, result.stderr, result.status, self.max_tool_output_chars, self.code_timeout_s))

    def _trajectory(self, seq: _Seq) -> Trajectory:
        completion = [t for s in seq.segments[1:] for t in s.ids]
        return Trajectory(seq.index, seq.segments, seq.logprobs, self.tokenizer.decode(completion),
                          seq.code_statuses, seq.finish_reason, seq.code_wall_ms)

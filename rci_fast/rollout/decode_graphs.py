"""The engine's decode step as CUDA graphs: every slot, one token each, replayed with one launch.

On a GPU a small model's decode step is launch-bound: ~880 kernels for a 24-layer model, ~17 us of
host time each in the VM it was measured on, against ~3 ms of GPU work (bench/RESULTS.md). A graph
replays them all from one launch. Shapes must be static, so the step always runs all slots (slots
that wait for the interpreter or are free ride along, as in the engine's eager decode) and attends
to a key length rounded up to a multiple of `bucket` (the extra keys are masked). One graph per
length bucket is captured on first use; inputs go through static buffers.

The graphs hold the addresses of the model's weights, its fused projections and the cache: they
belong to one `generate` call (the engine builds a new DecodeGraphs in each).
With capture=False the same static step runs eagerly: how the CPU tests check the logic.
"""
from __future__ import annotations

import torch

from rci_fast.model import KVCache, Transformer


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, n_slots: int, bucket: int = 256,
                 capture: bool = True):
        device = model.lm_head.weight.device
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.cache, self.bucket, self.capture = model, cache, bucket, capture
        self.ids = torch.zeros(n_slots, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(n_slots, 1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def length_for(self, max_position: int) -> int:
        return min(-(-(max_position + 1) // self.bucket) * self.bucket, self.cache.max_len)

    @torch.no_grad()
    def _step(self, length: int) -> torch.Tensor:
        h = self.model.forward_cached(self.ids, self.positions, self.cache, None, length)
        return self.model.lm_head(h[:, 0])

    @torch.no_grad()
    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [n_slots, V] of one decode step (slot i's token tokens[i] at positions[i]). The
        result is a static buffer: the next call overwrites it."""
        self.ids.copy_(torch.tensor(tokens).view(-1, 1), non_blocking=True)
        self.positions.copy_(torch.tensor(positions).view(-1, 1), non_blocking=True)
        length = self.length_for(max(positions))
        if not self.capture:
            return self._step(length)
        if length not in self.graphs:
            self.graphs[length] = self._capture(length)
        graph, logits = self.graphs[length]
        graph.replay()
        return logits

    def _capture(self, length: int):
        # Warm up on a side stream first (lazy initialisation must not be captured). The warm-up
        # writes the same keys and values the replay will: the inputs are already in place.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(length)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(length)
        return graph, logits

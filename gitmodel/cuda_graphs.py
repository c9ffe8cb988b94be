"""CUDA graphs for the decode steps: one graph per step, captured on first use, replayed after.

A decode step is ~100 small kernels over a handful of rows; launched one by one from Python the GPU
idles between them. Each step attends to one more cached position, so each step gets its own graph
over the exact slice it reads (no padding of the key length, no mask). Graphs are kept per batch
shape for the last few shapes seen (a pipeline sends full batches and, at the end, one smaller one).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from gitmodel.kv_cache import DecodeShape, KVCache

if TYPE_CHECKING:
    from gitmodel.generation import _Prompt
    from gitmodel.modeling import GitForCausalLM


class _StepGraphs:
    """The static buffers of one batch shape, and the graphs captured over them."""

    def __init__(self, shape: DecodeShape):
        self.cache, self.key_mask = shape.allocate()
        self.tokens = torch.zeros(shape.rows, dtype=torch.long, device=shape.device)
        self.positions = torch.zeros(shape.rows, dtype=torch.long, device=shape.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # Steps run in order and never overlap, so their graphs can share one memory pool.
        self.pool = torch.cuda.graph_pool_handle()
        self.warmed_up = False

    def run(self, model: GitForCausalLM, prompt: _Prompt, tokens: torch.Tensor, positions: torch.Tensor, step: int):
        from gitmodel.generation import decode_one_token_eager

        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        graph = self.graphs.get(step)
        if graph is None:
            if not self.warmed_up:
                # cuBLAS and the attention kernels set themselves up on a first eager call, never inside a capture.
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    decode_one_token_eager(model, prompt, self.tokens, self.positions, step)
                torch.cuda.current_stream().wait_stream(stream)
                self.warmed_up = True
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[step] = decode_one_token_eager(model, prompt, self.tokens, self.positions, step)
            self.graphs[step] = graph
        graph.replay()
        return self.logits[step]


class DecodeGraphs:
    def __init__(self, max_shapes: int = 2) -> None:
        self.max_shapes = max_shapes
        self._by_shape: OrderedDict[DecodeShape, _StepGraphs] = OrderedDict()

    def buffers(self, shape: DecodeShape) -> tuple[KVCache, torch.Tensor | None]:
        """The static cache and key mask that this shape's graphs read."""
        if shape not in self._by_shape:
            if len(self._by_shape) >= self.max_shapes:
                self._by_shape.popitem(last=False)
            self._by_shape[shape] = _StepGraphs(shape)
        self._by_shape.move_to_end(shape)
        graphs = self._by_shape[shape]
        return graphs.cache, graphs.key_mask

    def run(
        self, model: GitForCausalLM, prompt: _Prompt, tokens: torch.Tensor, positions: torch.Tensor, step: int
    ) -> torch.Tensor:
        from gitmodel.generation import decode_one_token_eager

        graphs = next((g for g in self._by_shape.values() if g.cache is prompt.cache), None)
        if graphs is None:  # a cache these graphs do not own (e.g. rows were dropped): run eagerly
            return decode_one_token_eager(model, prompt, tokens, positions, step)
        return graphs.run(model, prompt, tokens, positions, step)

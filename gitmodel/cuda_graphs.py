"""CUDA graphs for the decode steps: one graph per step, captured on first use, replayed after.

A decode step is ~100 small kernels over a handful of rows; launched one by one from Python the GPU
idles between them. Each step attends to one more cached position, so each step gets its own graph
over the exact slice it reads (no padding of the key length, no mask). Graphs are kept while batches
keep the same shape, which is what a captioning pipeline sends; a new shape recaptures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gitmodel.kv_cache import DecodeShape, KVCache

if TYPE_CHECKING:
    from gitmodel.generation import _Prompt
    from gitmodel.modeling import GitForCausalLM


class DecodeGraphs:
    def __init__(self) -> None:
        self.shape: DecodeShape | None = None

    def buffers(self, shape: DecodeShape) -> tuple[KVCache, torch.Tensor | None]:
        """The static cache and key mask that the graphs read: reused while the shape stays the same."""
        if shape != self.shape:
            self._reset(shape)
        return self.cache, self.key_mask

    def _reset(self, shape: DecodeShape) -> None:
        self.shape = shape
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.cache, self.key_mask = shape.allocate()
        self.tokens = torch.zeros(shape.rows, dtype=torch.long, device=shape.device)
        self.positions = torch.zeros(shape.rows, dtype=torch.long, device=shape.device)
        # Steps run in order and never overlap, so their graphs can share one memory pool.
        self.pool = torch.cuda.graph_pool_handle()
        self.warmed_up = False

    def run(
        self, model: GitForCausalLM, prompt: _Prompt, tokens: torch.Tensor, positions: torch.Tensor, step: int
    ) -> torch.Tensor:
        from gitmodel.generation import decode_one_token_eager

        if prompt.cache is not self.cache:
            return decode_one_token_eager(model, prompt, tokens, positions, step)
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

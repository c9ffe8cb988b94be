"""CUDA graphs for generation steps: each step captured on first use, replayed after.

A decode step is ~100 small kernels over a handful of rows, and choosing the token adds ~20 more;
launched one by one from Python the GPU idles between them. Each step attends to one more cached
position, so each step gets its own graph over the exact slice it reads (no padding of the key
length, no mask). Graphs only read and write static buffers: the KV cache, the key mask, and the
buffers a search keeps for its whole run (`ShapeGraphs.static`). They are kept per batch shape for
the last few shapes seen (a pipeline sends full batches and, at the end, one smaller one).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

import torch

from gitmodel.kv_cache import DecodeShape, KVCache

T = TypeVar("T")


class ShapeGraphs:
    """The static buffers of one batch shape, and the graphs captured over them."""

    def __init__(self, shape: DecodeShape):
        self.cache, self.key_mask = shape.allocate()
        self._static: dict[str, object] = {}
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = {}
        # Steps run one after another on one stream, never overlapping, so their graphs can share one memory pool.
        self._pool = torch.cuda.graph_pool_handle()

    def static(self, name: str, allocate: Callable[[], T]) -> T:
        """Buffers that keep their addresses across calls (so graphs can read them), made once per shape."""
        if name not in self._static:
            self._static[name] = allocate()
        return self._static[name]  # type: ignore[return-value]

    def run(self, key: Hashable, step: Callable[[], T]) -> T:
        """Replay the graph of `step` (captured the first time `key` is seen) and return its outputs.

        `step` must read and write only static buffers, and be idempotent: on first use it runs once
        eagerly before the capture (cuBLAS and the attention kernels set themselves up on a first
        eager call, never inside a capture), then once more as the graph's first replay.
        """
        entry = self._graphs.get(key)
        if entry is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = step()
            entry = self._graphs[key] = (graph, outputs)
        entry[0].replay()
        return entry[1]  # type: ignore[return-value]


class DecodeGraphs:
    def __init__(self, max_shapes: int = 2) -> None:
        self.max_shapes = max_shapes
        self._by_shape: OrderedDict[DecodeShape, ShapeGraphs] = OrderedDict()

    def buffers(self, shape: DecodeShape) -> tuple[KVCache, torch.Tensor | None]:
        """The static cache and key mask that this shape's graphs read."""
        if shape not in self._by_shape:
            if len(self._by_shape) >= self.max_shapes:
                self._by_shape.popitem(last=False)
            self._by_shape[shape] = ShapeGraphs(shape)
        self._by_shape.move_to_end(shape)
        graphs = self._by_shape[shape]
        return graphs.cache, graphs.key_mask

    def owning(self, cache: KVCache) -> ShapeGraphs | None:
        """The graphs over `cache`, or None for a cache they do not own (e.g. one whose finished rows were dropped)."""
        return next((graphs for graphs in self._by_shape.values() if graphs.cache is cache), None)

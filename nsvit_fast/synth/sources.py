"""Where the synthesis fast mode takes each step's clean batch from.

A source hands out this rank's slice of the next global batch as clean (u, z, p): patch tokens
(b, N, D), logits (b, K) and probabilities (b, K), all fp32 and without a graph.

- :class:`CachedSource`: a fixed image tensor in memory, batches from a seeded BatchStream, clean
  values from a :class:`~nsvit_fast.synth.cache.CleanCache` (computed once per image while the
  weights stay put). The fast path for small data.
- :class:`StreamSource`: a :class:`~nsvit_fast.data.stream.StreamingData` folder. Under augmentation
  every crop is new, so nothing can be cached: clean values are computed per batch, no graph.
"""

from __future__ import annotations

import contextlib

import torch

from ..data.batches import BatchStream, check_even
from .cache import CleanCache


class CachedSource:
    """Batches of a CleanCache's images in the order of ``BatchStream(n, batch_size, seed)``."""

    def __init__(self, cache: CleanCache, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.cache, self.rank, self.world = cache, rank, world
        self.autocast = cache.autocast
        check_even(cache.images.shape[0], batch_size, world, "the synthesis data")
        self.stream = BatchStream(cache.images.shape[0], batch_size, seed)

    def next(self):
        """This rank's slice of the next batch: clean (u (b, N, D), z (b, K), p (b, K)), fp32."""
        with torch.profiler.record_function("data"):
            idx = self.stream.next()[self.rank::self.world]
        return self.cache.get(idx)  # labels its own gather (data) and fills (clean_forward)


class StreamSource:
    """Clean values of the next batch of a streaming folder, computed under ``autocast`` (a context
    factory, e.g. ``Runtime.autocast``) and returned in fp32."""

    def __init__(self, parts, data, autocast=contextlib.nullcontext):
        self.parts, self.data, self.autocast = parts, data, autocast

    @torch.no_grad()
    def next(self):
        """The folder's next batch: clean (u (b, N, D), z (b, K), p (b, K)), fp32, no graph."""
        with torch.profiler.record_function("data"):
            x, _ = self.data.next()
        with torch.profiler.record_function("clean_forward"), self.autocast():
            u = self.parts.patch_embed(x)
            z = self.parts.encode(u)
        z = z.float()
        return u.float(), z, z.softmax(-1)

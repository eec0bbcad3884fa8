"""Clean patch tokens, logits and probabilities of a fixed image set, computed once, without a graph.

The synthesis fast mode reads a batch's clean values from here instead of recomputing them every
step. Entries are computed lazily (the first time an image is in a batch) and dropped whenever
the model's weights change, so a cache outlives a synthesis call exactly as long as it is valid:
across the rounds of a study on one model, not across finetuning rounds. Within a call, parameter
version counters, storage pointers and dtypes catch a change; each :func:`synthesize` call also
compares a hash of the weights (:meth:`CleanCache.sync`), since some writes bump no counter
(``p.data.copy_``, an EMA swap through ``.data``, a fused optimizer step). Past ``max_bytes`` it
stores nothing and computes per batch.
"""

from __future__ import annotations

import contextlib

import torch

from ..models.base import Adapter


def weights_version(parts: Adapter) -> tuple:
    """A value that changes whenever a parameter is written in place through autograd-visible ops
    (torch's version counters), replaced, given new storage (``p.data = ...``) or cast: a cheap
    check per batch. Writes through ``p.data`` keep the counter: :meth:`CleanCache.sync` hashes."""
    return tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in parts.parameters())


def autocast_dtype(autocast) -> torch.dtype | None:
    """The autocast dtype of a context factory: ``Runtime.autocast``'s runtime's, None otherwise
    (fp32, or a factory of unknown precision)."""
    return getattr(getattr(autocast, "__self__", None), "amp_dtype", None)


class CleanCache:
    """Clean (u, z, p) of ``images`` (n, C, H, W) under ``parts``, filled lazily, valid while the
    weights stay put (see the module docstring).

    Args:
        parts: the model adapter (its weights are read, never written).
        images: (n, C, H, W) pixels in [0, 1], on any device; indexed per batch.
        device: where the cached values live (default: the model's).
        max_bytes: the store's size limit (u (n, N, D) + z, p (n, K) in fp32); past it nothing is
            stored and every :meth:`get` computes its batch.
        chunk: images per forward when filling.
        autocast: a context factory for the forwards (``Runtime.autocast``); values are kept fp32.
    """

    def __init__(self, parts: Adapter, images: torch.Tensor, device: torch.device | None = None,
                 max_bytes: int = 2 << 30, chunk: int = 256, autocast=contextlib.nullcontext):
        from ..errors import check_pixels

        check_pixels("CleanCache images", images)
        parts.check_images(images)
        self.parts, self.images, self.chunk = parts, images, chunk
        self.autocast = autocast  # the run's autocast (Runtime.autocast): forwards in its precision, values kept fp32
        self.amp_dtype = autocast_dtype(autocast)
        self.device = device or next(parts.parameters()).device
        n, (t, d), k = images.shape[0], parts.token_shape, parts.num_classes
        self.store = n * (t * d + 2 * k) * 4 <= max_bytes
        self._version = self._fingerprint = self._images_key = None
        if self.store:
            self.u = torch.empty(n, t, d, device=self.device)
            self.z = torch.empty(n, k, device=self.device)
            self.p = torch.empty(n, k, device=self.device)
            self.filled = torch.zeros(n, dtype=torch.bool)

    @torch.no_grad()
    @torch.profiler.record_function("clean_forward")
    def _compute(self, idx: torch.Tensor):
        x = self.images[idx].to(self.device, non_blocking=True)
        with self.autocast():
            u = self.parts.patch_embed(x)
            z = self.parts.encode(u)
        u, z = u.float(), z.float()
        return u, z, z.softmax(-1)

    @torch.no_grad()
    def get(self, idx: torch.Tensor):
        """Clean (u (B, N, D), z (B, K), p (B, K)) of images ``idx`` (a CPU index tensor of B
        indices), fp32 on the cache's device, no graph. Fills the missing entries first; a change
        of weights since the last call empties the store."""
        if not self.store:
            return self._compute(idx)
        v = weights_version(self.parts)  # entries belong to these weights and pixels only
        pix = (self.images._version, self.images.data_ptr())
        if v != self._version or pix != self._images_key:
            self.filled.zero_()
            self._version, self._images_key, self._fingerprint = v, pix, None
        miss = idx[~self.filled[idx]]
        for i in range(0, miss.numel(), self.chunk):
            j = miss[i:i + self.chunk]
            self.u[j.to(self.device)], self.z[j.to(self.device)], self.p[j.to(self.device)] = self._compute(j)
            self.filled[j] = True
        with torch.profiler.record_function("data"):
            di = idx.to(self.device)
            return self.u[di], self.z[di], self.p[di]

    def sync(self, fingerprint: str) -> None:
        """Keep the entries only if they were computed under weights whose
        :func:`~nsvit_fast.models.weights_fingerprint` is ``fingerprint`` (the current weights'):
        it sees writes that bump no version counter. :func:`synthesize` calls it once per call."""
        if self.store and (fingerprint != self._fingerprint or weights_version(self.parts) != self._version):
            self.filled.zero_()
            self._version = weights_version(self.parts)
            self._images_key = (self.images._version, self.images.data_ptr())
        self._fingerprint = fingerprint

    def all(self):
        """Clean values of every image, in order."""
        return self.get(torch.arange(self.images.shape[0]))

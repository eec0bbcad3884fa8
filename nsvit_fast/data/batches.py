"""Seeded minibatch indices: the same seed gives the same batches in every mode, and the batches of
an in-memory dataset served from them."""

from __future__ import annotations

import torch


class BatchStream:
    """Endless batches of indices into n items: a fresh seeded permutation per epoch, full batches
    only (the last partial batch of an epoch is dropped), or the whole permuted set if n < batch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        self.n, self.b = int(n), int(min(batch_size, n))
        self.g = torch.Generator().manual_seed(int(seed))
        self._perm, self._pos = None, 0

    def next(self) -> torch.Tensor:
        """The next batch's image indices (batch_size,), int64: consecutive slices of one seeded
        permutation; a new permutation when fewer than batch_size indices are left (the rest dropped)."""
        if self._perm is None or self._pos + self.b > self.n:
            self._perm, self._pos = torch.randperm(self.n, generator=self.g), 0
        idx = self._perm[self._pos:self._pos + self.b]
        self._pos += self.b
        return idx

    def state_dict(self) -> dict:
        """Where the stream is: {"generator": uint8 state, "perm": (n,) int64 or None, "pos": int}.
        ``load_state_dict`` of it continues with the same batches."""
        return {"generator": self.g.get_state(), "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()``; raises NsvitError if it was taken over a different item count."""
        perm = state.get("perm")
        if perm is not None and perm.numel() != self.n:
            from ..errors import NsvitError

            raise NsvitError(f"batch stream state covers {perm.numel()} items, this stream {self.n}")
        self.g.set_state(state["generator"])
        self._perm, self._pos = perm, int(state["pos"])


def check_even(n: int, batch_size: int, world: int, what: str) -> None:
    """Refuse a global batch that W ranks cannot share evenly: each takes ``[rank::world]`` and their
    means are averaged, which is the batch's mean only for equal slices (a rank with none would
    average in a NaN). The batch is ``min(batch_size, n)`` (:class:`BatchStream`)."""
    b = min(int(batch_size), int(n))
    if world > 1 and b % world:
        from ..errors import NsvitError

        size = (f"{what} holds {n} images, fewer than its batch size {batch_size}, so a step's batch is all {n}"
                if n < batch_size else f"{what}'s batch size is {b}")
        raise NsvitError(f"{size}, which does not divide by the {world} processes (each takes an equal slice): "
                         f"give a batch size or image count that does")


class TensorBatches:
    """(x, y) batches of an in-memory ImageDataset in the order of ``BatchStream(n, batch_size, seed)``:
    this rank's ``[rank::world]`` slice of each global batch, moved to ``device``. The same interface
    as :class:`nsvit_fast.data.stream.StreamingData` (``next``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, data, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        self.data, self.rank, self.world, self.device = data, rank, world, torch.device(device)
        check_even(len(data), batch_size, world, "the training data")
        self.stream = BatchStream(len(data), batch_size, seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.stream.next()[self.rank::self.world]
        return self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

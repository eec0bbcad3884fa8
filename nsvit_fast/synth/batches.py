"""The seeded batch order lives in :mod:`nsvit_fast.data.batches`; this name stays for old imports."""

from ..data.batches import BatchStream

__all__ = ["BatchStream"]

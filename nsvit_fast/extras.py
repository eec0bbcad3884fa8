"""Optional dependencies: imported where they are used, with a one-line install hint when missing.

Shared by ``train`` (the pgd and trades methods) and ``eval`` (the attacks), so neither imports
the other.
"""

from __future__ import annotations

from .errors import NsvitError


def load_torchattacks():
    """The ``torchattacks`` module. Raises NsvitError with the install line when it is missing."""
    try:
        import torchattacks
    except ImportError:
        raise NsvitError("this needs torchattacks: pip install --no-deps torchattacks "
                         "(--no-deps: its requests pin would downgrade other packages)") from None
    return torchattacks


__all__ = ["load_torchattacks"]

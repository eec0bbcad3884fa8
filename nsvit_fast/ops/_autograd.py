"""Double backward through the kernels' autograd Functions: refused with a clear error.

The Triton, C++ and CUDA backwards write their gradients with kernels autograd cannot see
through, so a gradient taken with ``create_graph=True`` would be a constant to autograd and a
second derivative through it silently wrong (the missing terms counted as zero). torch's
``once_differentiable`` does not prevent that: its error node hangs off detached copies of the
gradients, so ``.backward()`` reaches it but ``torch.autograd.grad(..., inputs)`` skips it and
returns the wrong value, and where the incoming gradient is a constant (``grad(loss.sum(), x,
create_graph=True)``) it adds no node at all although the gradient of a nonlinear op still depends
on x through what forward saved. :func:`once_differentiable` below links the error node to the
incoming gradients and to the tensors the backward's result depends on, so that every second
derivative through it raises.
"""

from __future__ import annotations

import functools

import torch


class _Refuse(torch.autograd.Function):
    """A zero that depends on ``links``; differentiating it raises (the error of a double backward)."""

    @staticmethod
    def forward(ctx, name, like, *links):
        ctx.name = name
        return like.new_zeros(())

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name}: trying to differentiate twice a function that was marked with "
                           f"@once_differentiable (its kernels' gradient is a constant to autograd: no double "
                           f"backward); use backend='torch' for higher-order gradients")


def once_differentiable(fn):
    """Decorator for an autograd Function's ``backward`` written with kernels (not differentiable).

    The backward runs under ``no_grad``. With ``create_graph=True`` each tensor it returns is
    linked (adding an exact zero) to a node that raises if a second derivative reaches it; the
    links are the incoming gradients and ``ctx.links``, the forward's tensor inputs that the
    gradient depends on besides them (a nonlinear op's forward sets it with :func:`links`; kept as
    graph handles only, their values are not read). A plain backward is unchanged."""
    name = fn.__qualname__

    @functools.wraps(fn)
    def backward(ctx, *grads):
        with torch.no_grad():
            out = fn(ctx, *grads)
        if not torch.is_grad_enabled():  # no create_graph: nobody can differentiate the result
            return out
        deps = (*grads, *getattr(ctx, "links", ()))
        deps = [t for t in deps if isinstance(t, torch.Tensor) and t.requires_grad]
        if not deps:  # the result really is a constant
            return out
        single = not isinstance(out, tuple)
        res = tuple(o + _Refuse.apply(name, o, *deps) if isinstance(o, torch.Tensor) else o
                    for o in ((out,) if single else out))
        return res[0] if single else res

    return backward


def links(*tensors) -> tuple:
    """For a nonlinear op's forward (``ctx.links = links(...)``): for each of ``tensors`` that
    requires grad (the inputs its gradient depends on through what forward saved), a 0-dim zero
    made from one of its elements. It carries the graph edge to the tensor but not its memory (a
    (B, N, D) input held until backward would cost an activation)."""
    with torch.enable_grad():  # forward runs under no_grad
        return tuple(t[(0,) * t.dim()] * 0 for t in tensors
                     if isinstance(t, torch.Tensor) and t.requires_grad and t.numel())


__all__ = ["once_differentiable", "links"]

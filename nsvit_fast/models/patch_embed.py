"""The part shared by model families whose stem is timm's linear ``PatchEmbed`` (ViT, EVA): the
stem check, the adapter base with the geometry, ``patch_embed`` and ``patch_projection``, and the
attention switches the attention maps need (``unfused_attention``, ``attention_in_graph``). A new
family with such a stem subclasses :class:`PatchEmbedAdapter` in its own file.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import NsvitError
from .base import Adapter


def check_linear_stem(model: nn.Module, name: str) -> None:
    """Raise NsvitError unless the patch embedding is one non-overlapping linear projection."""
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if pe is None or type(pe).__name__ != "PatchEmbed" or not isinstance(proj, nn.Conv2d):
        stem = type(pe).__name__ if pe is not None else "none"
        raise NsvitError(f"{name}: non-linear patch stem ({stem}); the adapter needs a single "
                         f"linear patch projection (timm PatchEmbed with a Conv2d)")
    if (proj.kernel_size != proj.stride or proj.padding not in ((0, 0), 0)
            or proj.dilation != (1, 1) or proj.groups != 1):
        raise NsvitError(f"{name}: overlapping or padded patch convolution (kernel {proj.kernel_size}, "
                         f"stride {proj.stride}, padding {proj.padding}); patches must not overlap")
    if getattr(pe, "norm", None) is not None and not isinstance(pe.norm, nn.Identity):
        raise NsvitError(f"{name}: the patch embedding ends in a {type(pe.norm).__name__}, which is not "
                         f"linear; the adapter needs a single linear patch projection")
    if getattr(pe, "dynamic_img_pad", False):
        raise NsvitError(f"{name}: dynamic_img_pad pads partial patches; not supported")
    if pe.img_size is None:
        raise NsvitError(f"{name}: the patch embedding has no fixed img_size; create the model with one")
    if any(s % k for s, k in zip(pe.img_size, proj.kernel_size)) and not getattr(pe, "dynamic_img_size", False):
        raise NsvitError(f"{name}: img_size {tuple(pe.img_size)} is not a multiple of the patch "
                         f"{tuple(proj.kernel_size)}: the convolution would drop the edge pixels; give a multiple")


@contextmanager
def unfused_attention(attns: list[nn.Module]):
    """Switch timm attention modules to their explicit softmax path (same maths; the fused kernel
    never forms the attention matrix) for the duration; restored after, also on error."""
    saved = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        yield
    finally:
        for a, f in zip(attns, saved):
            a.fused_attn = f


def attention_in_graph(adapter: Adapter, attns: list, u: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``adapter.encode(u)`` on the unfused attention path, and each block's attention
    probabilities (B, heads, T, T) taken where they leave ``attn_drop``: the tensors the logits
    were computed from. Every module is checked before any hook is placed.

    Raises:
        NsvitError: a block whose attention has no ``fused_attn`` switch or ``attn_drop``."""
    if not all(hasattr(a, "fused_attn") and hasattr(a, "attn_drop") for a in attns):
        bad = next(type(a).__name__ + (" (a block without .attn)" if a is None else "")
                   for a in attns if not hasattr(a, "fused_attn") or not hasattr(a, "attn_drop"))
        raise NsvitError(f"{adapter.name}: attention maps in the graph need timm attention blocks with an "
                         f"unfused path, found {bad}")
    adapter.check_tokens(u)
    maps: list[torch.Tensor] = []
    with unfused_attention(attns):
        hooks = [a.attn_drop.register_forward_hook(lambda mod, inp, out: maps.append(out)) for a in attns]
        logits = adapter.encode_hooked(u, hooks)
    bad = next((type(a).__name__ for a, m in zip(attns, maps) if m.shape[1] != getattr(a, "num_heads", m.shape[1])),
               None)
    if bad:  # DiffAttention: two softmaxes a head, combined after attn_drop: not the probabilities
        raise NsvitError(f"{adapter.name}: attention maps in the graph need one softmax per head; {bad} has two")
    return logits, maps


class PatchEmbedAdapter(Adapter):
    """The part shared by families whose stem is timm's linear ``PatchEmbed`` (ViT, EVA): geometry,
    ``patch_embed``, ``patch_projection`` and the hidden states. Arguments as ``Adapter``.

    A model that does not end in a classifier (``num_classes=0``, ``global_pool=""``) is adapted
    for its patch embedding (the exact nullspace needs no head); its ``encode`` raises NsvitError.

    Raises:
        NsvitError: a patch stem that is not one non-overlapping linear projection."""

    def __init__(self, model: nn.Module, mean, std, name: str = "", **record):
        check_linear_stem(model, name or type(model).__name__)
        pe = model.patch_embed
        self.in_chans = pe.proj.in_channels
        self.img_size = tuple(pe.img_size)
        self.patch_size = tuple(pe.patch_size)
        self.grid_size = tuple(pe.grid_size)
        self.embed_dim = pe.proj.out_channels
        self.num_classes = int(getattr(model, "num_classes", 0))
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.has_class_token = getattr(model, "cls_token", None) is not None
        super().__init__(model, mean, std, name, **record)
        pool = getattr(model, "global_pool", "token")
        if not pool or self.num_classes < 1:  # logits per token, or features: every softmax would mean another thing
            self.not_a_classifier = (f"{self.name}: the model must end in a classifier giving logits (B, classes), "
                                     f"got global_pool={pool!r}, num_classes={self.num_classes}"
                                     + ("; give num_classes=N (--num-classes N)" if self.num_classes < 1 else ""))
        self._nhwc = bool(getattr(model, "dynamic_img_size", False))

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_images(x)
        self.check_device("images", x)
        w = self.model.patch_embed.proj.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)  # float64 / float16 pixels for a float32 model: conv2d refuses mixed dtypes
        u = self.model.patch_embed(self.normalize(x))
        return u.flatten(1, 2) if u.dim() == 4 else u  # dynamic_img_size models emit NHWC

    def grid_tokens(self, u: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) in the layout the model's ``_pos_embed`` takes: (B, gh, gw, D) for
        ``dynamic_img_size`` models, else unchanged."""
        return u.reshape(u.shape[0], *self.grid_size, u.shape[-1]) if self._nhwc else u

    def encode_with_hidden(self, u: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``encode(u)`` and the input tokens of every block [(B, P + N, D)], in the graph (Grad-CAM
        reads the last block's input: with class-token pooling its output patch tokens never reach
        the logits)."""
        hidden: list[torch.Tensor] = []
        hooks = [blk.register_forward_pre_hook(lambda mod, args: hidden.append(args[0])) for blk in self.model.blocks]
        return self.encode_hooked(u, hooks), hidden

    def patch_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        proj = self.model.patch_embed.proj
        w = proj.weight / self.std.to(proj.weight.dtype).reshape(1, -1, 1, 1)
        return w, proj.bias

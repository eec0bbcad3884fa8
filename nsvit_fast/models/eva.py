"""Adapter for timm's ``Eva`` family: EVA and EVA-02, and the RoPE ViTs timm builds on the same class
(``vit_*_patch16_rope_*``: axial, mixed and with an absolute embedding too).

The stem is the same linear ``PatchEmbed`` as ViT's, so ``patch_embed``, ``patch_projection`` and
the nullspace carry over unchanged. ``encode`` calls the model's own ``_pos_embed`` (prefix tokens,
absolute embedding, patch dropout and the rotary embedding, which depends on token positions only,
never on token values: noise added to u is rotated exactly as the clean tokens are), ``norm_pre``,
each block with its rotary embedding (one per depth for mixed RoPE) as ``Eva.forward_features``
loops over them, ``norm`` and ``forward_head``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .patch_embed import PatchEmbedAdapter, attention_in_graph


def _eva_class():
    from timm.models.eva import Eva

    return Eva


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``Eva`` (EVA, EVA-02, the RoPE ViTs)."""
    return isinstance(model, _eva_class())


class EvaAdapter(PatchEmbedAdapter):
    """Adapter of timm's ``Eva``; arguments and errors as ``PatchEmbedAdapter``."""

    family = "eva"
    serves = "timm Eva: EVA-02 and the RoPE ViTs"

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        self.check_tokens(u)
        m = self.model
        t, rope = m._pos_embed(self.grid_tokens(u))
        t = m.norm_pre(t)
        per_block = getattr(m, "rope_mixed", False) and rope is not None
        for i, blk in enumerate(m.blocks):
            r = rope[i] if per_block else rope
            if m.grad_checkpointing and torch.is_grad_enabled():
                t = checkpoint(blk, t, rope=r, use_reentrant=False)
            else:
                t = blk(t, rope=r)
        return m.forward_head(m.norm(t))

    def encode_with_attention(self, u: torch.Tensor, in_graph: bool = False
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``encode(u)`` and every block's attention probabilities [(B, heads, T, T)], T = P + N,
        after the rotary embedding, as the blocks use them. Always taken in the graph (timm's
        unfused path; the rotary embedding makes rebuilding them from a hook longer than running
        it), so ``in_graph`` changes nothing here and the logits may differ from the fused
        ``encode(u)`` in the last float bits."""
        return attention_in_graph(self, [getattr(blk, "attn", None) for blk in self.model.blocks], u)

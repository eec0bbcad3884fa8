"""Adapter for timm's VisionTransformer family (ViT, DeiT, DeiT-distilled, register-token ViTs, ...).

``encode`` calls the model's own ``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``
and ``forward_head`` rather than copies of them, so prefix tokens (cls, registers, distillation),
``no_embed_class``, ``global_pool``, ``fc_norm`` and attention pooling behave exactly as in
``model(x)``. Only the adapter files know timm's internals; what the ViT and EVA adapters share
(the linear stem, the attention switches) is in ``patch_embed.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NsvitError
from .patch_embed import PatchEmbedAdapter, attention_in_graph


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a timm VisionTransformer (or a subclass: DeiT-distilled...)."""
    return isinstance(model, _vit_class())


class VitAdapter(PatchEmbedAdapter):
    """Adapter of timm's ``VisionTransformer`` and its subclasses. Arguments as ``Adapter``.

    Raises:
        NsvitError: a patch stem that is not one non-overlapping linear projection."""

    family = "vit"
    serves = "timm VisionTransformer and its subclasses"

    def tokens(self, u: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) -> encoder input (B, P + N, D): prefix tokens and positional embedding."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(self.grid_tokens(u))))

    def blocks(self, t: torch.Tensor) -> torch.Tensor:
        """Encoder input (B, P + N, D) -> normed features (B, P + N, D)."""
        return self.model.norm(self.model.blocks(t))

    def head(self, t: torch.Tensor) -> torch.Tensor:
        """Normed features -> logits (B, K), pooled as the model's global_pool / fc_norm say."""
        if getattr(self.model, "distilled_training", False) and self.model.training:  # timm gives (cls, dist)
            raise NsvitError(f"{self.name}: distillation training is on (set_distilled_training(True)): its head "
                             f"returns two outputs; call model.set_distilled_training(False)")
        return self.model.forward_head(t)

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        self.check_tokens(u)
        return self.head(self.blocks(self.tokens(u)))

    def encode_with_attention(self, u: torch.Tensor, in_graph: bool = False
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``encode(u)`` and every block's attention probabilities [(B, heads, T, T)], T = P + N.

        timm computes attention with a fused kernel that never forms the matrix, so by default it
        is rebuilt here from the qkv projection (hooked) as softmax(q k^T * scale), after q_norm /
        k_norm as timm applies them: the logits stay the fused ``encode(u)``'s, and the maps are
        differentiable with respect to u (PatchFool, attention rollout). With ``in_graph`` the
        blocks run timm's unfused path and the maps are taken where they leave ``attn_drop``, so
        the logits are computed from them (Chefer relevance)."""
        attns = [getattr(blk, "attn", None) for blk in self.model.blocks]
        if in_graph:
            return attention_in_graph(self, attns, u)
        maps: list[torch.Tensor] = []
        hooks = []
        for blk, attn in zip(self.model.blocks, attns):  # all checked before any hook is placed
            if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")) \
                    or attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:  # DiffAttention: two maps a head
                raise NsvitError(f"{self.name}: attention maps need timm's standard Attention blocks, found "
                                 f"{type(attn).__name__ if attn is not None else type(blk).__name__ + ' (no .attn)'}")
        for attn in attns:

            def hook(mod, inp, out, attn=attn):
                b, t, _ = out.shape
                qkv = out.reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
                maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1))

            hooks.append(attn.qkv.register_forward_hook(hook))
        return self.encode_hooked(u, hooks), maps

    def _fusable_first_block(self):
        """(prefix (P, D), pos, embed_prefix, first block) when the first block can take its
        LayerNorm from the fused token-assembly op, else None (the plain path then runs)."""
        m = self.model
        blk = m.blocks[0] if len(m.blocks) else None
        if (self._nhwc or m.pos_embed is None or not isinstance(m.norm_pre, nn.Identity)
                or not isinstance(m.patch_drop, nn.Identity) or (m.training and m.pos_drop.p > 0)
                or type(blk).__name__ != "Block" or not isinstance(blk.norm1, nn.LayerNorm)
                # the fused op takes the affine LayerNorm of one last dimension (timm's default)
                or blk.norm1.weight is None or blk.norm1.bias is None
                or tuple(blk.norm1.normalized_shape) != (self.embed_dim,)):
            return None
        pre = [t[0] for t in (m.cls_token, getattr(m, "dist_token", None), m.reg_token) if t is not None]
        d = self.embed_dim
        prefix = torch.cat(pre) if pre else m.pos_embed.new_zeros(0, d)
        rows = self.num_patches + (0 if m.no_embed_class else prefix.shape[0])
        # a subclass whose _pos_embed places other tokens (DeiT-distilled skips reg tokens) runs its own
        if prefix.shape[0] != self.num_prefix_tokens or m.pos_embed.shape[1] != rows:
            return None
        return prefix, m.pos_embed[0], not m.no_embed_class, blk

    def encode_noisy(self, u, v, include_clean=False, backend=None):
        """As the base class, with the token assembly (prefix, u + v_m, positional embedding, the first
        block's LayerNorm) as one op from ``nsvit_fast.ops``: fused kernels on CUDA, the torch
        reference (timm's own arithmetic, so exactly ``encode``) on the CPU."""
        self.check_noisy(u, v, include_clean)
        fuse = self._fusable_first_block()
        if fuse is None:
            return super().encode_noisy(u, v, include_clean, backend)
        from .. import ops

        prefix, pos, embed_prefix, blk = fuse
        n1 = blk.norm1
        x, ln = ops.token_assembly(u, v, prefix, pos, n1.weight, n1.bias, n1.eps, embed_prefix, include_clean,
                                   backend=backend)
        x = x + blk.drop_path1(blk.ls1(blk.attn(ln)))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return self.head(self.model.norm(self.model.blocks[1:](x)))

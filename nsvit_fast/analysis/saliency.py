"""Saliency maps for ViTs, on the patch grid, each normalised to [0, 1]:

- ``attention``: the last block's attention from the class token to each patch (heads averaged);
  the mean over query tokens for models without a class token.
- ``rollout``: attention rollout (Abnar & Zuidema 2020): the product over blocks of
  0.5 * A + 0.5 * I (heads averaged, rows renormalised), read from the class token (or averaged).
- ``gradcam``: Grad-CAM on tokens (Selvaraju et al. 2017, adapted): the last block's input tokens
  A, gradient G of the target logit; weights = mean of G over patch tokens; map = ReLU(A w).
- ``chefer``: Chefer, Gur & Wolf's gradient-weighted relevance (ICCV 2021, "Generic
  Attention-model Explainability"): R = I, then for each block R += mean_heads((dA * A)^+) R,
  with dA the gradient of the target logit; read like rollout. Class-specific, unlike rollout.
  (Their earlier full LRP variant needs a relevance rule per layer type and is not implemented.)
"""

from __future__ import annotations

import torch

METHODS = ("attention", "rollout", "gradcam", "chefer")


def _norm(m: torch.Tensor) -> torch.Tensor:
    m = m - m.flatten(1).min(1).values.reshape(-1, 1, 1)
    return m / m.flatten(1).max(1).values.clamp_min(1e-12).reshape(-1, 1, 1)


def saliency(parts, x: torch.Tensor, method: str = "rollout", target: torch.Tensor | None = None) -> torch.Tensor:
    """Maps (B, gh, gw) in [0, 1] for images x (B, C, H, W); ``target`` classes for gradcam
    (default: the predicted class)."""
    from ..errors import NsvitError

    if method not in METHODS:
        raise NsvitError(f"unknown saliency method {method!r} (methods: {', '.join(METHODS)})")
    p0 = parts.num_prefix_tokens
    has_cls = getattr(parts.model, "cls_token", None) is not None
    gh, gw = parts.grid_size
    if method == "gradcam":
        with torch.enable_grad():
            u = parts.patch_embed(x)
            logits, hidden = parts.encode_with_hidden(u)
            cls = logits.argmax(-1) if target is None else target
            a = hidden[-1]
            g, = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), a)
        a, g = a[:, p0:], g[:, p0:]
        w = g.mean(1, keepdim=True)                                   # (B, 1, D)
        cam = torch.relu((a * w).sum(-1))                             # (B, N)
        return _norm(cam.detach().reshape(-1, gh, gw))
    if method == "chefer":
        return _chefer(parts, x, target, p0, has_cls)
    with torch.no_grad():
        _, maps = parts.encode_with_attention(parts.patch_embed(x))
    if method == "attention":
        a = maps[-1].mean(1)                                          # (B, T, T)
        row = a[:, 0, p0:] if has_cls else a[:, p0:, p0:].mean(1)
        return _norm(row.reshape(-1, gh, gw))
    eye = torch.eye(maps[0].shape[-1], device=x.device)
    roll = eye.expand(x.shape[0], -1, -1)
    for m in maps:
        a = 0.5 * m.mean(1) + 0.5 * eye
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    row = roll[:, 0, p0:] if has_cls else roll[:, p0:, p0:].mean(1)
    return _norm(row.reshape(-1, gh, gw))


def _chefer(parts, x, target, p0: int, has_cls: bool) -> torch.Tensor:
    from ..errors import NsvitError

    # timm's fused attention never forms A, so switch each block to its explicit softmax path
    # (same maths) and take A where it enters attn_drop: there it is in the graph.
    attns = [getattr(blk, "attn", None) for blk in parts.model.blocks]
    if not all(hasattr(a, "fused_attn") and hasattr(a, "attn_drop") for a in attns):
        raise NsvitError(f"{parts.name}: chefer maps need timm's standard Attention blocks")
    u = parts.patch_embed(x)  # before the hooks: a bad input raises with nothing left attached
    maps: list[torch.Tensor] = []
    saved = [a.fused_attn for a in attns]
    hooks = [a.attn_drop.register_forward_hook(lambda mod, inp, out: maps.append(out)) for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        with torch.enable_grad():
            logits = parts.encode_hooked(u, hooks)
            cls = logits.argmax(-1) if target is None else target
            grads = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), maps)
    finally:
        for a, f in zip(attns, saved):
            a.fused_attn = f
    t = maps[0].shape[-1]
    rel = torch.eye(t, device=x.device).expand(x.shape[0], -1, -1)
    for a, g in zip(maps, grads):
        rel = rel + (g * a.detach()).clamp_min(0).mean(1) @ rel
    row = rel[:, 0, p0:] if has_cls else rel[:, p0:, p0:].mean(1)
    return _norm(row.reshape(x.shape[0], *parts.grid_size))

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
    """Saliency maps of an adapter for images x (B, C, H, W) in [0, 1].

    Args:
        parts: the model's adapter (``nsvit_fast.models.Adapter``).
        method: one of ``METHODS`` (see the module docstring).
        target: classes (B,) for the class-specific methods gradcam and chefer; by default the
            predicted class.

    Returns:
        maps (B, gh, gw) on the patch grid, each normalised to [0, 1].

    Raises:
        NsvitError: an unknown method, images that are not float pixels in [0, 1] of the model's
            shape, a target that is not one class index per image, or a model whose attention the
            adapter cannot read.
    """
    from ..errors import NsvitError, check_labels, check_pixels
    from ..models import adapt

    if method not in METHODS:
        raise NsvitError(f"unknown saliency method {method!r} (methods: {', '.join(METHODS)})")
    parts = adapt(parts)
    check_pixels("images", x)
    if target is not None:  # one class per image: a shorter target would broadcast without a word
        target = check_labels("target", target, x.shape[0], parts.num_classes).to(x.device)
    p0 = parts.num_prefix_tokens
    has_cls = parts.has_class_token
    gh, gw = parts.grid_size
    if method in ("gradcam", "chefer") and torch.is_inference_mode_enabled():
        raise NsvitError(f"saliency {method!r} takes gradients: call it outside torch.inference_mode()")
    if method == "gradcam":
        with torch.enable_grad():
            # the tokens as a leaf: a frozen model (no parameter needing grad) had no graph to differentiate
            u = parts.patch_embed(x).detach().requires_grad_(True)
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
    u = parts.patch_embed(x)  # a bad input raises here, before the adapter places any hook
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)  # a frozen model's graph starts here
        # the maps must be the ones the logits came from: the adapter's in-graph attention
        logits, maps = parts.encode_with_attention(u, in_graph=True)
        cls = logits.argmax(-1) if target is None else target
        grads = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), maps)
    t = maps[0].shape[-1]
    rel = torch.eye(t, device=x.device).expand(x.shape[0], -1, -1)
    for a, g in zip(maps, grads):
        rel = rel + (g * a.detach()).clamp_min(0).mean(1) @ rel
    row = rel[:, 0, p0:] if has_cls else rel[:, p0:, p0:].mean(1)
    return _norm(row.reshape(x.shape[0], *parts.grid_size))

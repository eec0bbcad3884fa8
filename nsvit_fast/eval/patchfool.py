"""Patch-Fool (Fu et al., ICLR 2022) as its authors wrote it (RICE-EIC/Patch-Fool, ``main.py`` and
``utils.PCGrad``), as a torchattacks ``Attack``: pixels in [0, 1] in and out, normalisation inside.

The authors' attack (their defaults; the vanilla Patch-Fool of their README, sparse and mild
variants not included):

1. Patch choice on the clean image (``patch_select``): ``attn``: the ``num_patch`` patches that
   receive the most attention at block ``atten_select`` (default 4), averaged over heads and query
   tokens, prefix tokens dropped; ``saliency``: the largest summed |d CE / d x| per patch;
   ``random``: uniform patch indices.
2. delta lives in **normalised** space: it starts as a uniformly random image, normalised, and is
   clamped to the normalised range of [0, 1] after every step. The chosen patches of the image are
   replaced by delta: ``x_n * (1 - mask) + delta * mask``.
3. ``steps`` (250) Adam steps (lr 0.22, StepLR(step_size 10, gamma 0.95)) ascend the batch-mean CE.
4. ``attack_mode="attention"`` (the README's vanilla Patch-Fool) adds, for each block l in
   1 .. L // 2 - 1, the gradient of the attention loss ``mean over images and query tokens of
   log a_l[q, p]`` (a_l: block l's attention averaged over heads; p: the first chosen patch's
   token), first projected by the authors' PCGrad against the CE gradient where they conflict, then
   weighted by ``atten_loss_weight`` (0.002). ``attack_mode="ce"`` uses the CE gradient alone (the
   argparse default of ``main.py``, ``--attack_mode CE_loss``).

The authors' PCGrad divides the dot product by ||g_ce|| once, not ||g_ce||^2, so it removes the
conflicting component exactly only when ||g_ce|| = 1; :func:`pcgrad` keeps their arithmetic.

:func:`patchfool_lite` is this project's earlier, faster variant; it is not Patch-Fool (see there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NsvitError
from ..extras import load_torchattacks

PATCH_SELECTS = ("attn", "saliency", "random")
ATTACK_MODES = ("attention", "ce")


def patch_mask(parts, idx: torch.Tensor) -> torch.Tensor:
    """(B, k) patch indices -> (B, 1, H, W) float mask of those patches."""
    gh, gw = parts.grid_size
    ph, pw = parts.patch_size
    m = torch.zeros(idx.shape[0], gh * gw, device=idx.device)
    m.scatter_(1, idx, 1.0)
    m = m.reshape(-1, 1, gh, gw)
    return m.repeat_interleave(ph, 2).repeat_interleave(pw, 3)


def attention_patches(maps: list[torch.Tensor], layer: int, num_prefix: int, k: int) -> torch.Tensor:
    """The authors' ``Attn`` patch choice: (B, k) indices of the patches with the most attention at
    block ``layer``, averaged over heads and query tokens (maps: [(B, heads, T, T)], T = P + N)."""
    received = maps[layer].mean(dim=1).mean(dim=-2)[:, num_prefix:]  # (B, N)
    return received.argsort(dim=1, descending=True)[:, :k]


def saliency_patches(grad: torch.Tensor, patch_size: tuple[int, int], k: int) -> torch.Tensor:
    """The authors' ``Saliency`` patch choice: (B, k) indices of the patches with the largest sum
    of |grad| (B, C, H, W) over channels and pixels (their conv2d with a ones filter)."""
    ph, pw = patch_size
    ones = torch.ones(1, grad.shape[1], ph, pw, dtype=grad.dtype, device=grad.device)
    per_patch = F.conv2d(grad.abs(), ones, stride=(ph, pw)).flatten(1)
    return per_patch.argsort(dim=1, descending=True)[:, :k]


def attention_loss(attn: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """One block's attention loss as the authors compute it: ``F.nll_loss(-log(a), p)`` over all
    (image, query) rows = the mean over images and query tokens of log a[q, p], where a is the
    attention (B, heads, T, T) averaged over heads and ``token`` (B,) the attacked token p."""
    a = attn.mean(dim=1)
    rows = a.reshape(-1, a.shape[-1])                       # (B * T, T), image-major as theirs
    target = token.repeat_interleave(a.shape[1])            # each image's token for its T rows
    return F.nll_loss(-torch.log(rows), target)


def pcgrad(atten_grad: torch.Tensor, ce_grad: torch.Tensor) -> torch.Tensor:
    """The authors' PCGrad (``utils.PCGrad``) per image: where cos(g_att, g_ce) < 0,
    g_att - (g_att . g_ce / ||g_ce||) g_ce; elsewhere g_att. (B, ...) in, same shape out."""
    a, c = atten_grad.flatten(1), ce_grad.flatten(1)
    conflict = F.cosine_similarity(a, c, dim=1) < 0
    proj = a - ((a * c).sum(-1) / c.norm(dim=-1))[:, None] * c
    return torch.where(conflict[:, None], proj, a).reshape(atten_grad.shape)


def _attack_base():
    load_torchattacks()  # the NsvitError that says how to install it
    from torchattacks.attack import Attack

    return Attack


class PatchFool(_attack_base()):
    """The authors' Patch-Fool as a torchattacks attack on an adapter (``load_model(...)``).

    ``atk = PatchFool(parts); x_adv = atk(x, y)``: x pixels (B, C, H, W) in [0, 1]; returns the
    adversarial pixels, equal to x outside the ``num_patch`` chosen patches. Defaults are the
    authors'. Random draws (delta's start, ``random`` patches) come from a generator seeded with
    ``seed`` that advances across calls. Raises NsvitError for bad settings (``atten_select``
    must be a block of the model)."""

    def __init__(self, model, num_patch: int = 1, patch_select: str = "attn", atten_select: int = 4,
                 attack_mode: str = "attention", atten_loss_weight: float = 0.002, lr: float = 0.22,
                 steps: int = 250, step_size: int = 10, gamma: float = 0.95, seed: int = 0):
        super().__init__("PatchFool", model)
        for name in ("encode_with_attention", "patch_embed", "grid_size", "patch_size", "num_prefix_tokens"):
            if not hasattr(model, name):
                raise NsvitError(f"PatchFool needs a ViT adapter (load_model(...)); {type(model).__name__} "
                                 f"has no {name}")
        if patch_select not in PATCH_SELECTS:
            raise NsvitError(f"patch_select must be one of {', '.join(PATCH_SELECTS)}, got {patch_select!r}")
        if attack_mode not in ATTACK_MODES:
            raise NsvitError(f"attack_mode must be one of {', '.join(ATTACK_MODES)}, got {attack_mode!r}")
        if not 1 <= int(num_patch) <= model.num_patches:
            raise NsvitError(f"num_patch must be in 1..{model.num_patches}, got {num_patch}")
        if int(atten_select) < 0:
            raise NsvitError(f"atten_select must be a block index >= 0, got {atten_select}")
        if int(steps) < 0 or int(step_size) < 1:
            raise NsvitError("steps must be >= 0, step_size >= 1")
        from ..errors import check_number
        from .attacks import SETTING_RANGES  # the suites' bounds: float32 stays finite (gamma > 1 grows lr)

        for k, v in (("lr", lr), ("gamma", gamma), ("atten_loss_weight", atten_loss_weight)):
            _, lo, lo_open, hi = SETTING_RANGES[k]
            check_number(k, v, lo=lo, lo_open=lo_open, hi=hi)
        self.num_patch, self.patch_select, self.atten_select = int(num_patch), patch_select, int(atten_select)
        self.loss_mode, self.atten_loss_weight = attack_mode, float(atten_loss_weight)  # torchattacks owns .attack_mode
        self.lr, self.steps, self.step_size, self.gamma = float(lr), int(steps), int(step_size), float(gamma)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _logits_attn(self, xn: torch.Tensor):
        """Logits and attention maps [(B, heads, T, T)] of one block each, of a normalised image batch."""
        parts = self.model
        logits, maps = parts.encode_with_attention(parts.patch_embed(xn * parts.std + parts.mean))
        if self.patch_select == "attn" and self.atten_select >= len(maps):
            raise NsvitError(f"atten_select must be a block index in 0..{len(maps) - 1} of {parts.name}, "
                             f"got {self.atten_select}")
        return logits, maps

    @staticmethod
    def attention_layers(depth: int) -> list[int]:
        """The blocks the attention loss attacks: the authors' ``range(len(atten) // 2)`` without 0."""
        return list(range(1, depth // 2))

    def choose_patches(self, xn: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, num_patch) patch indices on the clean normalised images ``xn``, by ``patch_select``."""
        parts, b = self.model, xn.shape[0]
        if self.patch_select == "random":
            return torch.randint(0, parts.num_patches, (b, self.num_patch), generator=self.generator).to(xn.device)
        delta = torch.zeros_like(xn, requires_grad=self.patch_select == "saliency")
        with torch.set_grad_enabled(self.patch_select == "saliency"):
            logits, maps = self._logits_attn(xn + delta)
        if self.patch_select == "attn":
            return attention_patches(maps, self.atten_select, parts.num_prefix_tokens, self.num_patch)
        grad, = torch.autograd.grad(F.cross_entropy(logits, y), delta)
        return saliency_patches(grad, parts.patch_size, self.num_patch)

    def gradient(self, loss: torch.Tensor, maps: list[torch.Tensor], delta: torch.Tensor,
                 token: torch.Tensor) -> torch.Tensor:
        """The ascent direction of one step: the CE gradient, plus in attention mode each attacked
        block's PCGrad-projected attention-loss gradient x ``atten_loss_weight``."""
        grad, = torch.autograd.grad(loss, delta, retain_graph=self.loss_mode == "attention")
        if self.loss_mode == "ce":
            return grad
        ce = grad.detach().clone()
        layers = self.attention_layers(len(maps))
        for i, layer in enumerate(layers):
            g, = torch.autograd.grad(attention_loss(maps[layer], token), delta, retain_graph=i < len(layers) - 1)
            grad = grad + pcgrad(g, ce) * self.atten_loss_weight
        return grad

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images (B, C, H, W) in [0, 1] for images in [0, 1] and labels (B,): only
        the chosen patches change; the perturbation is optimised in normalised space (as the
        authors') and kept within the valid pixel range."""
        parts = self.model
        x = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        mean, std = parts.mean.to(x), parts.std.to(x)
        lo, hi = (0 - mean) / std, (1 - mean) / std
        xn = (x - mean) / std
        idx = self.choose_patches(xn, y)
        mask = patch_mask(parts, idx).to(x)
        token = idx[:, 0] + parts.num_prefix_tokens  # the attention loss targets the first patch
        start = torch.rand(x.shape, generator=self.generator).to(x)
        delta = torch.max(torch.min((start - mean) / std, hi), lo).requires_grad_(True)
        xn = xn * (1 - mask)
        opt = torch.optim.Adam([delta], lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_size, gamma=self.gamma)
        for _ in range(self.steps):
            logits, maps = self._logits_attn(xn + delta * mask)
            grad = self.gradient(F.cross_entropy(logits, y), maps, delta, token)
            opt.zero_grad()
            delta.grad = -grad
            opt.step()
            sched.step()
            with torch.no_grad():
                delta.copy_(torch.max(torch.min(delta, hi), lo))
        adv = (xn + delta.detach() * mask) * std + mean
        return adv.clamp(0, 1)  # in [0, 1] up to rounding already


def patchfool_lite(parts, x: torch.Tensor, y: torch.Tensor, n_patches: int = 1, steps: int = 30, lr: float = 0.2,
                   attn_weight: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A faster Patch-Fool-like patch attack (this project's earlier ``patchfool``); not the
    authors' attack. Adversarial images (B, C, H, W) in [0, 1], x changed only in ``n_patches`` patches.

    Differences from :class:`PatchFool`: patches chosen by attention averaged over all blocks (not
    block 4); the attention term is the mean attention *probability* the patches receive over all
    blocks, weight 1, added to CE (not log-attention over blocks 1 .. L/2 - 1, weight 0.002, PCGrad);
    Adam lr 0.2 constant for 30 steps (not 0.22 with StepLR(10, 0.95) for 250); delta in pixel space,
    so one step moves a pixel about 4x further than the authors' step in normalised space."""
    if not 1 <= n_patches <= parts.num_patches:
        raise NsvitError(f"n_patches must be in 1..{parts.num_patches}, got {n_patches}")
    p0 = parts.num_prefix_tokens
    with torch.no_grad():
        _, maps = parts.encode_with_attention(parts.patch_embed(x))
        received = torch.stack([m.mean(1).mean(1) for m in maps]).mean(0)[:, p0:]  # (B, N)
        idx = received.topk(n_patches, dim=1).indices
    mask = patch_mask(parts, idx)
    tok = idx + p0
    delta = torch.rand(x.shape, generator=generator).to(x).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        x_adv = x * (1 - mask) + delta * mask
        logits, maps = parts.encode_with_attention(parts.patch_embed(x_adv))
        att = torch.stack([m.mean(1).gather(2, tok[:, None, :].expand(-1, m.shape[2], -1)).mean((1, 2))
                           for m in maps]).mean(0)                                     # (B,)
        loss = F.cross_entropy(logits, y) + attn_weight * att.mean()
        opt.zero_grad()
        (-loss).backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(0, 1)
    return (x * (1 - mask) + delta.detach() * mask).clamp(0, 1)

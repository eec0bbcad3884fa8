"""The noise synthesis engine: ε-approximate nullspace noise (paper Eq. 7-8, Alg. 1 lines 3-14).

    v_0 ~ U(-lim, lim)^(N x D)                     one noise, broadcast over the batch, added to u
    repeat on minibatches:  stop if mean ||softmax(z(u+v)) - softmax(z(u))||^2 < eps   (before the update)
                            v <- AdamW(v, grad of mean ||z(u+v) - z(u)||)               cosine lr

Where the paper disagrees with itself this follows the official code: the logit distance not
squared (Eq. 7; Alg. 1 line 12 squares it), the stop on MSE-prob (Alg. 1 lines 8-9; Eq. 8 stops on
the logit loss), AdamW (App. C; Alg. 1 line 13 writes plain SGD).

Modes (same mathematics, same trajectory for the same seed and batches):

- ``reference``: the official loop (``encoder_level_epsilon_noise`` in ``utils.py`` of the official
  code, https://github.com/Liu-Hy/NS-ViT) step for step: clean logits recomputed each step under
  ``no_grad``, the model's weights keep requires_grad (their gradients are computed, accumulated
  and discarded), the patch embedding twice, a host sync per step, torch.optim.AdamW +
  CosineAnnealingLR. A verbatim transcription of the official
  loop in tests/test_synth.py takes the same trajectory. The benchmark baseline; one noise at a time.
- ``fast``: weights frozen for the duration, clean tokens/logits computed once per image without a
  graph (:class:`CleanCache`), the stop test taken from the same forward as the loss, one noisy
  forward and one input-only backward per step, stop flags read by the host every ``check_every``
  steps (1 on the CPU, where reading is free; 16 on CUDA) and at steps 1, 2, 4, 8, ... (a warm start
  often passes at once). Many noises are optimised in one batched
  computation, each stopping on its own: a finished noise is frozen by the masked AdamW at once and
  dropped from the computation at the next check.

Learning-rate schedule (``lr_schedule``): ``official`` (default) is the official code's
``CosineAnnealingLR(optimizer, len(loader) * rounds)``. The official loop runs at most
``rounds * int(img_ratio * len(loader))`` steps (img_ratio 0.1; ImageNet at batch 128, 3 rounds:
3 x 1001 = 3003, the paper's T = 3000) but anneals over all ``rounds * len(loader)`` batches, so
T_max is 1 / img_ratio = 10 times the step budget and the lr stays near ``lr`` for the whole descent
(0.0976 at step 3000 of 30,000). Here T_max = ``lr_t_max`` when given (30030 reproduces the ImageNet
run exactly), else ``OFFICIAL_T_MAX_RATIO * max_steps``: it does not depend on the size of the
data given, which for a small set would make the cosine cycle many times. ``max_steps`` anneals
to 0 at ``max_steps`` (T_max = max_steps; this project's schedule before issue 13, not the paper's).

Stop rules: ``batch`` (the paper's: the current batch passes) and ``heldout`` (a passing batch must
be confirmed on a fixed held-out set; after a failed confirmation the noise goes on and is not
re-checked for ``heldout_every`` steps).

Held-out images: only ``stop="heldout"`` (and ``schedule="boundary"``, which uses it) carves
``heldout`` images out of the data (seeded; a streamed folder too, ``StreamingData.carve``); they
are not trained on. Under ``stop="batch"``
(Algorithm 1) every image is trained on, and the bank's metrics (``mse_prob``, ``match_rate``) are
measured on ``heldout_data`` when given, else on a seeded sample of ``heldout`` training images
that stays in training: in-sample figures, recorded as ``meta["heldout_source"] = "train_sample"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import ops
from ..config import build
from ..distributed import all_mean, rank_world
from ..data.base import ImageDataset
from ..errors import NsvitError, check_finite, check_pixels, check_positive
from ..io import commit, current_umask, dumps, link_target, os_error
from ..models.base import Adapter
from ..models.registry import adapt
from .adamw import MaskedAdamW, cosine_lr
from .bank import NoiseBank
from ..data.batches import BatchStream
from ..data.stream import StreamingData
from ..runtime import Runtime
from .sources import CachedSource, StreamSource
from .cache import CleanCache
from .metrics import noise_effect

MODES = ("reference", "fast")
_phase = torch.profiler.record_function  # phase labels for `nsvit-fast profile synth`
SCHEDULES = ("paper", "boundary")
INIT_SCALES = ("none", "boundary")
GROW_SEARCHES = ("secant", "walk", "floor")
STOPS = ("batch", "heldout")
LR_SCHEDULES = ("official", "max_steps")
OFFICIAL_T_MAX_RATIO = 10  # official T_max / step budget = len(loader)*rounds / (rounds*img_ratio*len(loader))


@dataclass
class SynthConfig:
    """Synthesis settings; defaults are the paper's (App. C). One comment per field says what it
    sets; :func:`check_config` checks the ranges (``synthesize`` calls it)."""

    eps: float = 0.03            # ε of the ε-approximate nullspace (MSE of probabilities)
    lim: float = 3.0             # init v ~ U(-lim, lim)
    lim_unit: str = "abs"        # abs | token_rms: lim in units of the RMS of the model's clean patch tokens
    lr: float = 0.1              # AdamW learning rate of the noise
    lr_schedule: str = "official"  # official (cosine over 10 x max_steps, as the official code) | max_steps
    lr_t_max: int = 0            # lr_schedule=official: cosine T_max (0: OFFICIAL_T_MAX_RATIO * max_steps)
    weight_decay: float = 0.01   # AdamW default, as the official code
    max_steps: int = 3000        # T
    batch_size: int = 128        # B
    num_noises: int = 1          # M noises learned at once (fast mode batches them)
    mode: str = "fast"           # reference | fast
    schedule: str = "paper"      # paper | boundary
    stop: str = "batch"          # batch (paper) | heldout
    heldout: int = 256           # stop=heldout: images carved out (not trained on); stop=batch: metrics sample
    heldout_every: int = 10      # stop=heldout: steps between confirmations of one noise
    check_every: int = 0         # host reads the stop flags every k steps (and at 1, 2, 4, ...); 0: 1 on CPU, 16 on CUDA
    max_rows: int = 2048         # (noise, image) rows in one forward; more are chunked
    boundary_lr: float = 6.0     # schedule=boundary: descent learning rate = lr * boundary_lr
    boundary_iters: int = 8      # schedule=boundary: bisection steps on the scale
    boundary_grow: float = 4.0   # schedule=boundary: largest scale tried
    init_scale: str = "none"     # none | boundary: a given init is first scaled to just inside ε (forward only)
    init_min_scale: float = 1.0  # init_scale=boundary: scale at least this much (> 1: the descent then moves it)
    init_max_scale: float = 0.0  # init_scale=boundary: scale at most this much, over init_min_scale (0: no cap)
    grow_search: str = "secant"  # init_scale=boundary: secant (from scale 1) | walk (up from init_min_scale) | floor (none)
    seed: int = 0


def check_config(cfg: SynthConfig) -> SynthConfig:
    """Return ``cfg`` (whole floats as ints) if every field has its type and is in range; raise
    NsvitError naming the first one that is not (a SynthConfig built by hand skips ``build``'s
    type checks: ``max_steps=2.5``, ``eps="0.03"``). Ranges: eps, lim, lr, boundary_lr > 0;
    boundary_grow >= 1; weight_decay >= 0; counts >= 1; mode, schedule, stop, lr_schedule and
    lim_unit one of theirs; lr_t_max only with lr_schedule official; heldout, check_every >= 0;
    seed in [0, 2**32 - 1]."""
    import typing

    from ..config import check_type
    from ..errors import check_count, check_number, check_seed

    if not isinstance(cfg, SynthConfig):
        raise NsvitError(f"config must be a SynthConfig (or give its fields as keyword arguments), "
                         f"got {type(cfg).__name__}")
    hints = typing.get_type_hints(SynthConfig)
    cfg = dataclasses.replace(cfg, **{f.name: check_type(f.name, getattr(cfg, f.name), hints[f.name])
                                      for f in dataclasses.fields(cfg)})
    check_positive("eps", cfg.eps)
    if cfg.eps >= 2:  # MSE-prob is the squared distance of two probability vectors: at most 2
        raise NsvitError(f"eps must be < 2 (MSE-prob never exceeds 2, so every noise would pass), got {cfg.eps:g}")
    check_positive("lim", cfg.lim)
    check_positive("lr", cfg.lr)
    check_positive("init_min_scale", cfg.init_min_scale)
    if not cfg.init_max_scale >= 0:
        raise NsvitError(f"init_max_scale must be >= 0 (0: no cap), got {cfg.init_max_scale}")
    for name in ("max_steps", "batch_size", "num_noises", "max_rows", "heldout_every"):
        check_count(name, getattr(cfg, name))
    for name, allowed in (("mode", MODES), ("schedule", SCHEDULES), ("stop", STOPS), ("init_scale", INIT_SCALES),
                          ("grow_search", GROW_SEARCHES), ("lr_schedule", LR_SCHEDULES)):
        if getattr(cfg, name) not in allowed:
            raise NsvitError(f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if int(cfg.lr_t_max) < 0 or (cfg.lr_t_max and cfg.lr_schedule != "official"):
        raise NsvitError(f"lr_t_max must be >= 0 and is set with lr_schedule=official only, got {cfg.lr_t_max} "
                         f"with lr_schedule={cfg.lr_schedule}")
    if cfg.lim_unit not in ("abs", "token_rms"):
        raise NsvitError(f"lim_unit must be abs or token_rms, got {cfg.lim_unit!r}")
    for name in ("heldout", "check_every", "lr_t_max"):
        check_count(name, getattr(cfg, name), 0)
    check_number("weight_decay", cfg.weight_decay, lo=0)
    check_positive("boundary_lr", cfg.boundary_lr)
    check_number("boundary_grow", cfg.boundary_grow, lo=1)  # the scale search spans [1/grow, grow]
    check_count("boundary_iters", cfg.boundary_iters, 1)
    check_seed("seed", cfg.seed)
    return cfg


def lr_t_max(cfg: SynthConfig) -> int:
    """The cosine schedule's T_max (the lr for the update at 0-based step t is
    ``lr * (1 + cos(pi * t / T_max)) / 2``)."""
    if cfg.lr_schedule == "max_steps":
        return int(cfg.max_steps)
    return int(cfg.lr_t_max) or OFFICIAL_T_MAX_RATIO * int(cfg.max_steps)


@contextlib.contextmanager
def frozen(parts: Adapter, freeze: bool = True):
    """Eval mode and (if ``freeze``) no weight gradients for the duration; the flags and any existing
    ``.grad`` are restored afterwards, so the reference mode's discarded weight gradients never
    reach the caller's model."""
    was_training = parts.training
    flags = [p.requires_grad for p in parts.parameters()]
    grads = [p.grad for p in parts.parameters()]
    parts.eval()
    if freeze:
        for p in parts.parameters():
            p.requires_grad_(False)
    try:
        yield parts
    finally:
        for p, f, g in zip(parts.parameters(), flags, grads):
            p.requires_grad_(f)
            p.grad = g
        parts.train(was_training)


def image_tensor(data, parts: Adapter, name: str = "data") -> torch.Tensor:
    """data (an ImageDataset or a tensor) -> its checked (B, C, H, W) pixels in [0, 1]."""
    x = data.images if isinstance(data, ImageDataset) else data
    if not isinstance(x, torch.Tensor):
        hint = ""
        if isinstance(data, (str, Path)):  # a spec or a folder: say how to pass it
            hint = (f" ({str(data)!r}: load_data({str(data)!r}, parts=model) reads it; a folder also "
                    f"streams as StreamingData(root, model, batch_size))" if name == "data" else
                    f" ({str(data)!r}: load_data({str(data)!r}, parts=model) reads it)")
        raise NsvitError(f"{name} must be an ImageDataset or an image tensor"
                         + (" or a StreamingData folder" if name == "data" else "")
                         + f", got {type(data).__name__}{hint}")
    if x.dim() == 4 and x.shape[0] == 0:
        raise NsvitError(f"{name} is empty")
    check_pixels(name, x)
    parts.check_images(x[:1])
    return x


def split_heldout(images: torch.Tensor, n_held: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) images: ``n_held`` (at most a quarter) carved out by a seeded permutation;
    with n_held = 0, both are the whole set."""
    h = min(int(n_held), images.shape[0] // 4)
    if h == 0:
        return images, images
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[perm[h:].sort().values], images[perm[:h].sort().values]


def carve_heldout(images: torch.Tensor, n_held: int, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_heldout` for a run that promises held-out measurements (``what`` names it): data
    too small to hold any image out (under 4, or ``n_held`` 0) is refused, never measured on the
    training images in their place."""
    train, held = split_heldout(images, n_held, seed)
    if held is images:
        raise NsvitError(f"{what} measures on held-out images (heldout={n_held}, at most a quarter of the data): "
                         f"{images.shape[0]} image(s) leave none; give at least 4 images and heldout >= 1")
    return train, held


def metric_images(images: torch.Tensor, cfg: SynthConfig, heldout: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training images, images the bank's metrics are measured on, their source).

    ``heldout`` given: all images train, metrics on ``heldout`` ("given"). ``stop="heldout"``:
    :func:`split_heldout` carves ``cfg.heldout`` images out ("carved"). ``stop="batch"``
    (Algorithm 1): every image trains and the metrics use the same seeded ``cfg.heldout`` images,
    left in training ("train_sample"; all of them with heldout = 0)."""
    if heldout is not None:
        return images, heldout, "given"
    if cfg.stop == "heldout":
        what = "schedule=boundary (its descent stops on held-out images)" if cfg.schedule == "boundary" else \
            "stop=heldout"
        return *carve_heldout(images, cfg.heldout, cfg.seed, what), "carved"
    return images, split_heldout(images, cfg.heldout, cfg.seed)[1], "train_sample"


@torch.no_grad()
def token_rms(parts: Adapter, images: torch.Tensor, n: int = 512) -> float:
    """RMS of the clean patch tokens u over (up to n of) the images: the scale ``lim_unit="token_rms"``
    measures lim in, so one setting carries across models whose tokens have different scales."""
    x = images[:n].to(next(parts.parameters()).device)
    return float(torch.cat([parts.patch_embed(x[i:i + 256]) for i in range(0, x.shape[0], 256)]).pow(2).mean().sqrt())


def resolve_lim(parts: Adapter, cfg: SynthConfig, images: torch.Tensor) -> tuple[SynthConfig, float | None]:
    """cfg with lim in absolute units, and the token RMS used (None for lim_unit='abs')."""
    if cfg.lim_unit == "abs":
        return cfg, None
    rms = token_rms(parts, images)
    return dataclasses.replace(cfg, lim=cfg.lim * rms, lim_unit="abs"), rms


def initial_noises(parts: Adapter, cfg: SynthConfig, init: torch.Tensor | None) -> torch.Tensor:
    """The starting noises (M, N, D) float32 on the CPU: ``U(-lim, lim)`` from ``cfg.seed`` with
    M = ``cfg.num_noises`` when ``init`` is None, else a copy of ``init`` ((N, D) or (M, N, D));
    ``cfg.num_noises`` must then be 1 (the default) or M.
    Raises NsvitError for an init of the wrong shape or holding NaN / inf."""
    n, d = parts.token_shape
    if init is None:
        g = torch.Generator().manual_seed(cfg.seed)
        return (torch.rand(cfg.num_noises, n, d, generator=g) * 2 - 1) * cfg.lim
    if not isinstance(init, torch.Tensor) or not init.is_floating_point():
        got = str(init.dtype).replace("torch.", "") if isinstance(init, torch.Tensor) else type(init).__name__
        raise NsvitError(f"init must be a float tensor ({n}, {d}) or (M, {n}, {d}), got {got}")
    init = init.detach().float().cpu()
    if init.dim() == 2:
        init = init[None]
    if init.dim() != 3 or tuple(init.shape[1:]) != (n, d):
        raise NsvitError(f"init must be ({n}, {d}) or (M, {n}, {d}) for {parts.name}, got {tuple(init.shape)}")
    if cfg.num_noises not in (1, init.shape[0]):  # 1 is the default: an init's M decides then
        raise NsvitError(f"init holds {init.shape[0]} noise(s) but num_noises is {cfg.num_noises}: "
                         f"give {cfg.num_noises} noises or leave num_noises at 1")
    check_finite("init", init)
    return init.clone()


class _Log:
    """JSONL record of every check (one line per record) and the progress bar.

    The records go to a temporary file beside ``path``, renamed over it when the run succeeds
    (``close(ok=True)``) and removed when it fails: a log never half-written, and never appended to
    whatever file ``path`` was. NaN / inf values are written as null."""

    def __init__(self, path, total: int, progress: bool, desc: str):
        from tqdm.auto import tqdm

        self.path, self.f, self.tmp = (link_target(path) if path else None), None, None
        self.bar = tqdm(total=total, desc=desc, disable=None if progress else True, leave=False)  # None: a terminal only
        self._last = 0
        if self.path is not None:  # the temporary file last: the caller's try removes it from here on
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            except OSError as e:
                self.bar.close()
                raise os_error(self.path, e) from None
            self.tmp, self.f = Path(tmp), os.fdopen(fd, "w")

    def check(self, step: int, mse: torch.Tensor, norm: torch.Tensor, active: int, **extra) -> None:
        if self.f:
            rec = {"step": step, "active": active, "mse_prob": [round(float(x), 6) for x in mse],
                   "norm": [round(float(x), 4) for x in norm], **extra}
            self.f.write(dumps(rec) + "\n")
        if step + 1 < self._last:  # reference mode: the next noise's descent starts again at step 0
            self.bar.reset()
            self._last = 0
        self.bar.update(step + 1 - self._last)
        self._last = step + 1
        if len(mse):
            self.bar.set_postfix(mse=f"{float(mse.min()):.4f}", norm=f"{float(norm.mean()):.1f}", active=active)

    def close(self, ok: bool) -> None:
        self.bar.close()
        if self.f is None:
            return
        if ok:  # on disk before the rename makes it visible, as atomic_path does
            self.f.flush()
            os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        if not ok:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            os.chmod(self.tmp, 0o666 & ~current_umask())
            commit(self.tmp, self.path)  # under staged_writes: with the bank, or not at all
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise os_error(self.path, e) from None


def _reference_one(parts: Adapter, images: torch.Tensor, v0: torch.Tensor, cfg: SynthConfig, device,
                   confirm: Callable | None, log: _Log, autocast=contextlib.nullcontext, index: int = 0):
    """The official loop for one noise (``encoder_level_epsilon_noise``), the held-out confirmation
    of ``stop="heldout"`` aside. Returns (v (N, D), steps, converged, last batch MSE-prob).

    The official loop is fp32; under ``autocast`` (the run's precision) its two forwards run in it
    and the logits are read in fp32, as the fast mode does."""
    v = v0[None].to(device).clone().requires_grad_(True)  # (1, N, D), broadcast over the batch
    opt = torch.optim.AdamW([v], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=lr_t_max(cfg))
    stream = BatchStream(images.shape[0], cfg.batch_size, cfg.seed)
    blocked_until, mse_val = 0, float("nan")
    parts.zero_grad()  # once, as the official loop: the weight gradients then accumulate, unused
    for t in range(cfg.max_steps):
        with _phase("data"):
            x = images[stream.next()].to(device)
        with _phase("clean_forward"), torch.no_grad(), autocast():
            z = parts.encode(parts.patch_embed(x)).float()     # recomputed every step, no graph
        opt.zero_grad()
        with _phase("noisy_forward"), autocast():
            z_noisy = parts.encode(parts.patch_embed(x) + v)   # patch embedding a second time
        z_noisy = z_noisy.float()
        with _phase("loss_and_stop"):
            mse = ((z.softmax(-1) - z_noisy.softmax(-1)) ** 2).sum(-1).mean()
        with _phase("host_sync"):
            mse_val = mse.item()                               # every step
        log.check(t, torch.tensor([mse_val]), v.detach().norm().reshape(1).cpu(), 1, noise=[index])
        if mse_val < cfg.eps and t >= blocked_until:
            if confirm is None or bool(confirm(v.detach())[0]):
                return v.detach()[0], t, True, mse_val
            blocked_until = t + cfg.heldout_every
        with _phase("loss_and_stop"):
            loss = (((z_noisy - z) ** 2).sum(-1) ** 0.5).mean()
        with _phase("backward"):
            loss.backward()                                    # weight gradients too (requires_grad)
        with _phase("optimizer"):
            opt.step()
            sched.step()
    return v.detach()[0], cfg.max_steps, False, mse_val


def _fast(parts: Adapter, cache: CleanCache, v0: torch.Tensor, cfg: SynthConfig, device,
          confirm: Callable | None, log: _Log, lam: torch.Tensor | None = None):
    """All noises at once. Returns (V (M, N, D), steps (M,), converged (M,), last batch MSE-prob (M,)).

    With ``lam`` (M,) the loss is Eq. 4, prob-shift loss - lam * log ||v||, and nothing stops early."""
    m_all = v0.shape[0]
    n_tok, dim = parts.token_shape
    V = v0.to(device).clone()
    opt = MaskedAdamW(V.shape, device, cfg.lr, cfg.weight_decay)
    done = torch.zeros(m_all, dtype=torch.bool, device=device)
    steps = torch.full((m_all,), cfg.max_steps, dtype=torch.long, device=device)
    bmse = torch.full((m_all,), float("nan"), device=device)
    blocked = torch.zeros(m_all, dtype=torch.long, device=device)
    active = torch.arange(m_all, device=device)
    rank, world = rank_world()  # under torchrun: each rank its slice of the batch, means averaged
    src = cache if isinstance(cache, StreamSource) else CachedSource(cache, cfg.batch_size, cfg.seed, rank, world)
    k = cfg.check_every or (1 if torch.device(device).type == "cpu" else 16)
    t_max = lr_t_max(cfg)
    if cfg.stop == "heldout":
        k = 1  # a confirmation needs the host at the step the batch passes
    lam = None if lam is None else lam.to(device)
    for t in range(cfg.max_steps):
        u, z, p = src.next()  # labels its own phases (data, clean_forward)
        b = u.shape[0]
        per = max(1, cfg.max_rows // b)
        grads = torch.empty(active.numel(), n_tok, dim, device=device)
        mse = torch.empty(active.numel(), device=device)
        for c in range(0, active.numel(), per):
            rows = active[c:c + per]
            vc = V[rows].requires_grad_(True)
            with _phase("noisy_forward"), src.autocast():
                zn = parts.encode_noisy(u, vc)
            zn = zn.float().reshape(vc.shape[0], b, -1)  # the loss and stop test in fp32
            with _phase("loss_and_stop"):
                loss, mse[c:c + per], _ = ops.prob_shift(zn, z, cfg.eps, p)
                if lam is not None:
                    loss = loss - lam[rows] * vc.flatten(1).norm(dim=1).log()
            with _phase("backward"):
                grads[c:c + per], = torch.autograd.grad(loss.sum(), vc)
        if world > 1:
            with _phase("host_sync"):
                all_mean(grads)
                all_mean(mse)
        with _phase("loss_and_stop"):
            live = ~done[active]
            fire = (mse < cfg.eps) & live & (blocked[active] <= t) if lam is None else torch.zeros_like(live)
        if confirm is not None and bool(fire.any()):
            rows = fire.nonzero().flatten()
            ok = confirm(V[active[rows]])
            fire[rows[~ok]] = False
            blocked[active[rows[~ok]]] = t + cfg.heldout_every
        # also at steps 1, 2, 4, 8, ...: a warm-started noise often passes at once, and waiting for
        # step k would run up to k - 1 steps whose results are masked out anyway
        check = (t + 1) % k == 0 or (t + 1) & t == 0 or t == cfg.max_steps - 1
        tested = V[active].flatten(1).norm(dim=1) if check else None  # the norm this step's MSE is of
        with _phase("optimizer"):
            bmse[active] = torch.where(live, mse, bmse[active])
            steps[active] = torch.where(fire, torch.full_like(steps[active], t), steps[active])
            done[active] |= fire
            opt.step(V, grads, active, ~done[active], t + 1, cosine_lr(cfg.lr, t, t_max))
        if check:
            with _phase("host_sync"):
                log.check(t, mse.cpu(), tested.cpu(), int(active.numel()), noise=active.tolist())
                active = active[~done[active]]
            if active.numel() == 0:
                break
    return V, steps, done.clone(), bmse


def _held_effect(parts: Adapter, V: torch.Tensor, held: CleanCache, max_rows: int,
                 scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`noise_effect` on the held-out set, averaged across ranks under torchrun. Every
    decision synthesis takes on these numbers (the growth searches, the confirmation, the boundary
    scan) must be the same on every rank: one rank stopping its descent while another steps on
    would wait forever in the next all-reduce, and ranks picking different scales would train on
    different noises. The ranks measure the same images, but a GPU need not give them bit-equal
    sums, so the mean, the same on every rank, decides. No-op in one process."""
    mse, match = noise_effect(parts, V, held, max_rows, scales=scales)
    if rank_world()[1] > 1:
        both = all_mean(torch.stack([mse.float(), match.float()]))
        mse, match = both[0], both[1]
    return mse, match


def _to_boundary(parts: Adapter, V: torch.Tensor, held: CleanCache, cfg: SynthConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale each noise up to the ε boundary on the held-out set (forward passes only): returns the
    scaled noises (M, N, D), the scales (M,) and the held-out MSE-prob at scale 1 (M,).

    MSE-prob is not always monotone in the scale (a noise found from a large init can sit in a
    valley that is narrow in scale), so this follows the good interval that contains s = 1:
    scales 1, g, g^2, ... up to ``boundary_grow`` (g = 1.25) are tried, the largest s before the
    first failure is kept, and ``boundary_iters`` bisection steps refine it towards the next one.
    A noise that fails even at s = 1 (its descent never confirmed) is bisected down in [0, 1]."""
    g = 1.25
    k = max(1, int(math.floor(math.log(cfg.boundary_grow) / math.log(g) + 1e-9)))
    grid = g ** torch.arange(k + 1, dtype=torch.float32, device=V.device)           # 1, g, ..., g^k
    m = V.shape[0]
    cols = []
    for i in range(k + 1):  # up the grid until every noise has failed once: later scales are never used
        cols.append(_held_effect(parts, V, held, cfg.max_rows, scales=grid[i].expand(m))[0])
        if bool((torch.stack(cols, 1) >= cfg.eps).any(1).all()):
            break
    mses = torch.stack(cols + [torch.full((m,), float("inf"), device=V.device)] * (k + 1 - len(cols)), 1)
    ok = mses < cfg.eps                                                               # (M, k+1)
    first_bad = torch.where(ok.all(1), torch.full((m,), k + 1, device=V.device),
                            (~ok).float().argmax(1))
    lo = torch.where(first_bad > 0, grid[(first_bad - 1).clamp_min(0)], torch.zeros(m, device=V.device))
    hi = torch.where(first_bad > k, grid[-1], grid[first_bad.clamp_max(k)])
    hi = torch.where(first_bad == 0, torch.ones(m, device=V.device), hi)
    for _ in range(cfg.boundary_iters):
        mid = (lo + hi) / 2
        good = _held_effect(parts, V, held, cfg.max_rows, scales=mid)[0] < cfg.eps
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    lo = torch.where(first_bad > k, grid[-1], lo)  # good all the way: keep the largest scale tried
    return V * lo.reshape(-1, 1, 1), lo, mses[:, 0]


GROW_TARGET = 0.9  # init_scale=boundary aims at 0.9 ε and accepts [0.8, 1) ε: inside, near the edge


def _grow_to_eps(parts: Adapter, V: torch.Tensor, held: CleanCache, cfg: SynthConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale each noise to just inside the ε boundary on the held-out set, in forward passes only.

    A secant search on log MSE-prob against log scale (near a nullspace noise MSE-prob grows about
    as the square of the scale, the first slope taken), aiming at ``GROW_TARGET`` ε and stopping in
    [0.8, 1) ε: one forward at scale 1, then at most ``boundary_iters`` more, scales kept within
    [1 / boundary_grow, boundary_grow] and to x4 per step. :func:`_to_boundary`'s grid and bisection
    find the edge more exactly with about 15 forwards; a warm start needs only a point near it, as
    the descent's stop test follows. Returns the scaled noises (M, N, D), the scales (M,) (the
    largest scale seen inside ε; the smallest tried when none was) and the MSE-prob at scale 1 (M,)."""
    m, dev, eps = V.shape[0], V.device, cfg.eps
    s = torch.ones(m, device=dev)
    mse = _held_effect(parts, V, held, cfg.max_rows)[0]
    mse1 = mse.clone()
    best = torch.where(mse < eps, s, torch.zeros_like(s))
    smallest = s.clone()
    slope = torch.full((m,), 2.0, device=dev)
    for _ in range(cfg.boundary_iters):
        near = (mse < eps) & (mse >= 0.8 * eps)
        if bool(near.all()):
            break
        step = ((GROW_TARGET * eps) / mse.clamp_min(1e-12)) ** (1 / slope)
        s_new = torch.where(near, s, (s * step.clamp(0.25, 4.0)).clamp(1 / cfg.boundary_grow, cfg.boundary_grow))
        mse_new = _held_effect(parts, V, held, cfg.max_rows, scales=s_new)[0]
        moved = s_new != s
        fit = (mse_new.clamp_min(1e-12).log() - mse.clamp_min(1e-12).log()) / (s_new.log() - s.log())
        slope = torch.where(moved & fit.isfinite(), fit.clamp(0.5, 4.0), slope)
        s, mse = s_new, torch.where(moved, mse_new, mse)
        best = torch.where((mse < eps) & (s > best), s, best)
        smallest = torch.minimum(smallest, s)
    scale = torch.where(best > 0, best, smallest)
    return V * scale.reshape(-1, 1, 1), scale, mse1


def _grow_walk(parts: Adapter, V: torch.Tensor, held: CleanCache, cfg: SynthConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_grow_to_eps`'s job in fewer forwards when a floor f = ``init_min_scale`` > 1 is set.

    The secant search starts at scale 1 and, MSE-prob being steep and not monotone in the scale
    (x1.77 can take it from 0.009 to 0.33), overshoots both ways for most of its iterations, then
    the caller raises its answer to f anyway. This walk never tries below f: one forward at scale 1
    (the drift, for the log), then f, f g, f g^2, ... (g = 1.25) up to the cap (``init_max_scale``,
    else ``boundary_grow``) until one reaches 0.8 ε; a step past ε is bisected (at most 2 steps) and
    the largest scale seen inside ε is kept. A floor already past ε is kept: the descent pulls it
    back. With f = 1 and the noise already past ε, it steps down by g (to ``1 / boundary_grow``).
    Each noise walks alone (M is 1 in a warm-started round). Returns what :func:`_grow_to_eps` does."""
    g, eps = 1.25, cfg.eps
    f = max(1.0, cfg.init_min_scale)
    top = max(f, cfg.init_max_scale if cfg.init_max_scale > 0 else cfg.boundary_grow)

    def mse_at(v: torch.Tensor, s: float) -> float:
        return float(_held_effect(parts, v, held, cfg.max_rows, scales=torch.full((1,), s, device=v.device))[0][0])

    mse1 = _held_effect(parts, V, held, cfg.max_rows)[0]
    scales = []
    for i in range(V.shape[0]):
        v, e1 = V[i:i + 1], float(mse1[i])
        s, e = (1.0, e1) if f == 1.0 else (f, mse_at(v, f))
        if e >= eps:
            while f == 1.0 and e >= eps and s > 1 / cfg.boundary_grow:  # drifted out: back inside
                s = max(s / g, 1 / cfg.boundary_grow)
                e = mse_at(v, s)
            scales.append(s)
            continue
        lo, hi = s, None
        while e < 0.8 * eps and lo < top:
            s = min(lo * g, top)
            e = mse_at(v, s)
            if e >= eps:
                hi = s
                break
            lo = s
        for _ in range(2 if hi is not None else 0):
            mid = (lo * hi) ** 0.5
            e = mse_at(v, mid)
            if e < eps:
                lo = mid
                if e >= 0.8 * eps:
                    break
            else:
                hi = mid
        scales.append(lo)
    scale = torch.tensor(scales, dtype=torch.float32, device=V.device)
    return V * scale.reshape(-1, 1, 1), scale, mse1


def descend(parts: Adapter, train: torch.Tensor, v0: torch.Tensor, cfg: SynthConfig, device,
            confirm: Callable | None, log: _Log, cache: CleanCache | None = None, autocast=contextlib.nullcontext):
    """The descent alone, in ``cfg.mode``: (V (M, N, D), steps (M,), converged (M,), batch MSE (M,)).
    The caller holds :func:`frozen`. ``autocast``: the reference mode's forwards (the fast mode's
    come from its cache or source)."""
    if cfg.mode == "reference":
        outs = [_reference_one(parts, train, v0[i], cfg, device, confirm, log, autocast, i) for i in range(v0.shape[0])]
        return (torch.stack([o[0] for o in outs]), torch.tensor([o[1] for o in outs]),
                torch.tensor([o[2] for o in outs]), torch.tensor([o[3] for o in outs]))
    return _fast(parts, cache or CleanCache(parts, train, device), v0, cfg, device, confirm, log)


def check_finite_noise(V: torch.Tensor, cfg: SynthConfig) -> None:
    """A step that overflowed leaves NaN/inf noise, which would poison every batch it is added to."""
    if not bool(torch.isfinite(V).all()):
        raise NsvitError(f"the noise diverged to NaN/inf during descent (lr {cfg.lr:g}, lim {cfg.lim:g}); "
                         f"lower lr or lim")


def synthesize(model, data, config: SynthConfig | None = None, *, init: torch.Tensor | None = None,
               heldout_data=None, progress: bool = True, log: str | Path | None = None,
               device: str | torch.device | None = None, cache: CleanCache | None = None,
               precision: str = "fp32", runtime: Runtime | None = None, **overrides: Any) -> NoiseBank:
    """Learn ε-approximate nullspace noise(s) for ``model`` on ``data``.

    Args:
        model: an adapter (``load_model(...)``) or a timm ViT.
        data: an ImageDataset or an image tensor (B, C, H, W), pixels in [0, 1], or a
            :class:`~nsvit_fast.data.stream.StreamingData` folder (fast mode): its batches are
            streamed and their clean logits computed per batch without a graph; the held-out
            metrics use ``heldout_data``, else ``config.heldout`` images of the folder (eval
            transform): carved out under ``stop="heldout"``, an even sample under ``stop="batch"``.
        config: a SynthConfig; keyword ``overrides`` replace its fields (``eps=0.01, mode="reference"``).
        init: starting noise(s) (N, D) or (M, N, D) instead of U(-lim, lim); a warm start.
        heldout_data: images for the bank's metrics and ``stop="heldout"``. By default
            ``stop="heldout"`` carves ``config.heldout`` images out of ``data`` (seeded, not trained
            on), and ``stop="batch"`` trains on all of ``data`` and measures the metrics on a seeded
            sample of it (``meta["heldout_source"]``: given | carved | train_sample).
        log: path of a JSONL file that receives every check.
        device: where to compute (default: the model's device).
        precision: fp32 | tf32 | bf16 | fp16: autocast of the model's forwards; the noise, its
            AdamW state, the loss and the stop test stay fp32.
        runtime: a :class:`~nsvit_fast.runtime.Runtime` (device and precision together) instead.
        cache: a CleanCache over the training images to reuse across calls (fast mode); it drops
            its entries by itself when the weights change. Its images replace the held-out split.

    Returns a NoiseBank of M noises (M, N, D) with MSE-prob, match rate, norms, steps;
    ``meta["phase_seconds"]`` splits the call's time into setup (images, lim, clean caches), grow
    (a warm start's growth search), descent, to_boundary and metrics (the final held-out forward).
    A noise that never passes the stop rule within max_steps comes back with converged=False and a
    warning. The model's weights are not changed (the reference mode's weight gradients are
    discarded, ``requires_grad`` flags and ``.grad`` restored); it is moved to ``device``.

    Raises:
        NsvitError: a setting out of range or an unknown key (:func:`check_config`), data that is
        not an ImageDataset / image tensor / StreamingData, empty or outside [0, 1] or of the wrong
        image shape, an ``init`` of the wrong shape or not finite, a streamed folder with
        ``mode="reference"`` or ``cache=``, a ``cache`` of another model or image set, or an
        unavailable device / precision.
    """
    cfg = check_config(build(SynthConfig, config, overrides, "synthesis"))
    run_cfg = cfg
    if cfg.schedule == "boundary":  # larger steps down, confirmed on held-out data, then scale up
        run_cfg = dataclasses.replace(cfg, lr=cfg.lr * cfg.boundary_lr, stop="heldout")
    parts = adapt(model)
    parts.check_learnable("noise synthesis")
    t0 = time.perf_counter()
    rt = runtime or Runtime.create(device if device is not None else next(parts.parameters()).device, precision)
    device = rt.device
    parts.to(device)
    from ..models import weights_fingerprint

    fingerprint = weights_fingerprint(parts)  # the bank's record, and the check of a given cache
    source = None
    if isinstance(data, StreamingData):
        if cfg.mode != "fast" or cache is not None:
            raise NsvitError("a streamed folder runs in mode fast, without cache= (reference mode follows the "
                             "official loop over an in-memory tensor)")
        if heldout_data is not None:
            held, held_source = heldout_data, "given"
        elif run_cfg.stop == "heldout":  # as split_heldout in memory: seeded, set aside, never descended on
            data, held = data.carve(cfg.heldout, cfg.seed)
            held_source = "carved"
        else:  # Algorithm 1's metrics: an even sample of the folder (eval transform) that stays in training
            held, held_source = data.sample(cfg.heldout or 256), "train_sample"
        source = StreamSource(parts, data, rt.autocast)
        held_imgs = image_tensor(held, parts, "heldout_data")
        images = train = held_imgs  # the token RMS of lim_unit=token_rms is measured on these
    else:
        images = image_tensor(data, parts)
        if cache is not None:
            same = isinstance(cache, CleanCache) and (cache.images is images or (
                cache.images.shape == images.shape and torch.equal(cache.images.to(images.device), images)))
            if not same or cache.parts is not parts:  # clean logits of other images: a wrong target, no error
                raise NsvitError("cache= must be a CleanCache of this model over the training images")
            if cache.amp_dtype != rt.amp_dtype:  # its forwards would set the precision, not this call's
                amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(cache.amp_dtype, "fp32")
                raise NsvitError(f"cache= computes in {amp}, this call in precision "
                                 f"{rt.precision}: make the CleanCache with autocast=Runtime(...).autocast of "
                                 f"the same precision")
            cache.sync(fingerprint)  # a write no version counter saw (p.data.copy_) empties it
            train = images
            held_imgs = image_tensor(heldout_data, parts, "heldout_data") if heldout_data is not None else images
            held_source = "given" if heldout_data is not None else "train"
        else:
            held_given = image_tensor(heldout_data, parts, "heldout_data") if heldout_data is not None else None
            train, held_imgs, held_source = metric_images(images, run_cfg, held_given)
    lim_given = cfg.lim
    cfg, rms = resolve_lim(parts, cfg, train)
    run_cfg = dataclasses.replace(run_cfg, lim=cfg.lim, lim_unit="abs")
    v0 = initial_noises(parts, cfg, init)
    m = v0.shape[0]
    if source is not None:
        cache = source
    elif cfg.mode == "fast":
        cache = cache or CleanCache(parts, train, device, autocast=rt.autocast)
    held = cache if isinstance(cache, CleanCache) and held_imgs is train else \
        CleanCache(parts, held_imgs, device, autocast=rt.autocast)
    marks = [t0]

    def mark() -> float:  # seconds since the last mark; synchronised so a CUDA phase is charged to itself
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return round(marks[-1] - marks[-2], 4)

    def confirm(v: torch.Tensor) -> torch.Tensor:
        mse, _ = _held_effect(parts, v.reshape(-1, *parts.token_shape), held, cfg.max_rows)
        return mse < cfg.eps

    conf = confirm if run_cfg.stop == "heldout" else None
    logger = _Log(log, cfg.max_steps, progress, f"synth {cfg.mode}/{cfg.schedule} x{m}")
    try:  # at once: a Ctrl-C after the log's temporary file was made removes it
        phases = {"setup": mark()}
        with frozen(parts, freeze=cfg.mode == "fast"), rt.matmul_mode():
            init_stats, known = {}, None  # known: a held-out forward (noises, mse, match) the metrics may reuse
            if cfg.init_scale == "boundary" and init is not None:  # the given noise, grown along its good interval
                v0 = v0.to(device)
                capped = 0 < cfg.init_max_scale <= cfg.init_min_scale  # the cap binds whatever the search finds
                if capped or cfg.grow_search == "floor":  # no search: the cap, or the floor below the cap
                    mse1, match1 = _held_effect(parts, v0, held, cfg.max_rows)  # the drift, for the log
                    s0 = cfg.init_max_scale if capped else cfg.init_min_scale
                    if capped and abs(s0 - 1) <= 1e-6:  # at the cap already (a float32 norm ratio): as it is, and
                        s0, known = 1.0, (v0, mse1, match1)  # a descent that passes at once reuses this forward
                    scale = torch.full((m,), float(s0), device=device)
                    v0 = v0 if s0 == 1.0 else v0 * s0
                else:
                    if cfg.grow_search == "walk":
                        v0, scale, mse1 = _grow_walk(parts, v0, held, cfg)
                    else:
                        v0, scale, mse1 = _grow_to_eps(parts, v0, held, cfg)
                    if cfg.init_min_scale > 1:  # a noise the model ignores only at its own scale would stall at 1
                        up = (cfg.init_min_scale / scale).clamp_min(1.0)
                        v0, scale = v0 * up.reshape(-1, 1, 1), scale * up
                    if cfg.init_max_scale > 0:  # a norm cap: the direction carries on at the capped norm
                        down = (cfg.init_max_scale / scale).clamp_max(1.0)
                        v0, scale = v0 * down.reshape(-1, 1, 1), scale * down
                init_stats = {"init_mse_prob": mse1.cpu().tolist(), "init_scale_factor": scale.cpu().tolist()}
            phases["grow"] = mark()
            V, steps, conv, bmse = descend(parts, train, v0, run_cfg, device, conf, logger, cache, rt.autocast)
            check_finite_noise(V, cfg)
            phases["descent"] = mark()
            synth_seconds = time.perf_counter() - t0
            if cfg.schedule == "boundary":
                V = _to_boundary(parts, V, held, cfg)[0]
            phases["to_boundary"] = mark()
            if known is not None and torch.equal(V, known[0]):  # passed at step 0, unmoved: measured already
                mse, match = known[1], known[2]
            else:
                with torch.no_grad():
                    mse, match = _held_effect(parts, V, held, cfg.max_rows)
            phases["metrics"] = mark()
    except BaseException:
        logger.close(ok=False)
        raise
    logger.close(ok=True)
    bank = NoiseBank(
        noises=V.detach().float().cpu(), norm=V.detach().flatten(1).norm(dim=1).cpu(), mse_prob=mse.cpu(),
        match_rate=match.cpu(), steps=steps.cpu(), converged=conv.cpu().bool(), batch_mse_prob=bmse.cpu(),
        meta={**{k: v for k, v in asdict(cfg).items()}, "num_noises": m, "lim_given": lim_given,  # m: init='s count
              "token_rms": rms, "model": parts.name,
              # what the descent ran with: schedule=boundary takes lr x boundary_lr and the held-out stop
              "descent_lr": run_cfg.lr, "descent_stop": run_cfg.stop,
              "model_fingerprint": fingerprint, "token_shape": list(parts.token_shape),
              "heldout_images": int(held_imgs.shape[0]), "heldout_source": held_source,
              "train_images": len(data) if source is not None else int(train.shape[0]), "precision": rt.precision,
              "seconds": round(time.perf_counter() - t0, 3), "synth_seconds": round(synth_seconds, 3),
              "phase_seconds": phases, **init_stats})
    if not bool(bank.converged.all()):
        bad = int((~bank.converged).sum())
        warnings.warn(f"{bad} of {m} noise(s) did not pass the stop rule within max_steps={cfg.max_steps} "
                      f"(eps {cfg.eps}); they are returned with converged=False", stacklevel=2)
    return bank


# Eq. 4's weight on -log ||v||: the paper sweeps 0-8. Past ~1e20 its gradient squared overflows
# float32 in AdamW's second moment, every update is 0, and Fig. 3 would show an unlearned noise.
MAX_LAM = 1e6


def synthesize_regularized(model, data, lam, steps: int = 500, config: SynthConfig | None = None, *,
                           heldout_data=None, progress: bool = True, log: str | Path | None = None,
                           **overrides: Any) -> NoiseBank:
    """The exploratory Eq. 4 (paper Sec. 3.3, Fig. 3): minimise mean ||z(u+v) - z(u)|| - lam log ||v||
    for a fixed number of steps, no early stop, one noise per value of ``lam``, all in one batch.

    The bank's meta adds the permutation control (each noise's elements shuffled, seeded) scored by
    the same held-out metrics: ``permuted_mse_prob`` and ``permuted_match_rate``, and ``lam``.

    Args:
        model, data, heldout_data, progress, log: as :func:`synthesize` (data in memory).
        lam: one λ or a list; one noise (N, D) is learned per value.
        steps: descent steps for every noise (``max_steps``); none stops early.
        config, overrides: SynthConfig settings (``lim``, ``lr``, ``batch_size``...); mode is fast.

    Returns a NoiseBank with len(lam) noises. Raises NsvitError for a λ that is negative, above
    MAX_LAM or not finite, and as :func:`synthesize` for bad settings or data."""
    from ..errors import check_number

    vals = list(lam) if isinstance(lam, (list, tuple)) else [lam]
    if not vals:
        raise NsvitError("lam is empty: give one λ or a list of them")
    lams = torch.tensor([check_number("lam", v, lo=0, hi=MAX_LAM) for v in vals], dtype=torch.float32)
    cfg = check_config(build(SynthConfig, config, {**overrides, "max_steps": steps, "num_noises": len(lams),
                                                   "mode": "fast"}, "synthesis"))
    parts = adapt(model)
    parts.check_learnable("noise synthesis")
    t0 = time.perf_counter()
    device = next(parts.parameters()).device
    images = image_tensor(data, parts)
    train, held_imgs = (images, image_tensor(heldout_data, parts, "heldout_data")) if heldout_data is not None else \
        carve_heldout(images, cfg.heldout, cfg.seed, "Eq. 4 (Fig. 3)")
    v0 = initial_noises(parts, cfg, None)
    held = CleanCache(parts, held_imgs, device)
    logger = _Log(log, cfg.max_steps, progress, f"synth Eq.4 x{len(lams)}")
    try:
        with frozen(parts):
            V, _, _, bmse = _fast(parts, CleanCache(parts, train, device), v0, cfg, device, None, logger, lam=lams)
            check_finite_noise(V, cfg)
            mse, match = noise_effect(parts, V, held, cfg.max_rows)
            g = torch.Generator().manual_seed(cfg.seed + 1)
            perm = torch.stack([v.flatten()[torch.randperm(v.numel(), generator=g).to(device)].reshape(v.shape)
                                for v in V])
            pmse, pmatch = noise_effect(parts, perm, held, cfg.max_rows)
    except BaseException:
        logger.close(ok=False)
        raise
    logger.close(ok=True)
    from ..models import weights_fingerprint

    m = len(lams)
    return NoiseBank(
        noises=V.float().cpu(), norm=V.flatten(1).norm(dim=1).cpu(), mse_prob=mse.cpu(), match_rate=match.cpu(),
        steps=torch.full((m,), steps), converged=torch.zeros(m, dtype=torch.bool), batch_mse_prob=bmse.cpu(),
        meta={**asdict(cfg), "objective": "eq4", "lam": lams.tolist(), "permuted_mse_prob": pmse.cpu().tolist(),
              "permuted_match_rate": pmatch.cpu().tolist(), "model": parts.name,
              "model_fingerprint": weights_fingerprint(parts), "token_shape": list(parts.token_shape),
              "heldout_images": int(held_imgs.shape[0]), "seconds": round(time.perf_counter() - t0, 3)})


# Public names for the pieces the profiler (synth/profile.py) and bench/bench_synth.py drive directly.
SynthLog = _Log            # the JSONL check record and progress bar that ``descend`` writes to

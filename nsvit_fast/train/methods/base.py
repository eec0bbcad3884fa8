"""A finetuning method: what a round needs and the loss of one model step.

The engine owns the loop, optimiser, schedule, EMA, checkpoints and logs; a method only says

    prepare(ctx) -> noise (N, D) or None     once per round; ``ctx`` is a RoundContext
    loss(parts, x, y, noise) -> (loss, {name: float tensor})    once per model step, x pixels in [0, 1]

and declares its hyperparameters and traits on the class:

    Config               a dataclass of its hyperparameters (None: it has none), nested in
                         FinetuneConfig under the method's name like ``synth`` (``pgd.eps``)
    moved_keys           old flat FinetuneConfig keys -> the Config field that replaced them
    absent_means         Config fields added since -> what a checkpoint without them ran with,
                         where that is not today's default (so it resumes as it ran)
    needs_noise          prepare() may learn the round's NS noise (``ctx.ns_noise()``)
    rebuild_on_resume    prepare() builds objects the checkpoint does not hold (attacks), so a run
                         resumed inside a round calls it again (and keeps the checkpoint's noise)

A method reads the context and keeps its own objects; it never writes engine state. The engine
names no method. A new method is one file in this folder, one entry in ``METHODS`` and, with a
Config, one field of ``MethodConfigs`` (both in ``methods/__init__.py``); name the file in the
README's Layout (tests/test_boundaries.py checks it).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from ...extras import load_torchattacks  # noqa: F401  (public home: nsvit_fast.extras)


class RoundContext:
    """What a method sees at the start of round ``round``: the model, the round's seed, the NS noise
    on request, and a record for the round's log line.

    ``parts`` is the model adapter (in eval mode while ``prepare`` runs); ``seed`` the round's
    seed (``config seed * 100003 + round``). ``learn`` is the engine's synthesis of the round's
    ε-approximate noise: it returns (noise (N, D), log values) and keeps the engine's own state
    (the warm start) on the engine side."""

    def __init__(self, parts, round: int, seed: int, learn: Callable[[], tuple[torch.Tensor, dict]],
                 to_eps: Callable[[torch.Tensor], tuple[float, float]] | None = None):
        self.parts, self.round, self.seed = parts, round, seed
        self._learn, self._to_eps = learn, to_eps
        self.info: dict[str, Any] = {}

    def ns_noise(self) -> torch.Tensor:
        """The round's ε-approximate nullspace noise (N, D), learned on the current model (Alg. 1 line 14);
        its synthesis statistics go into the round's record."""
        noise, info = self._learn()
        self.info.update(info)
        return noise

    def eps_scale(self, noise: torch.Tensor) -> tuple[float, float]:
        """(s, MSE-prob at s): the scale that puts ``noise`` (N, D) just inside the run's ε
        (``synth.eps``; MSE-prob in [0.9 ε, ε)) on the current model, measured on the images the
        round's synthesis measures on, in forward passes only."""
        if self._to_eps is None:
            raise RuntimeError("this context has no eps_scale (the engine gives one)")
        return self._to_eps(noise)

    def record(self, **values) -> None:
        """Values for the round's line in log.jsonl (e.g. ``noise_norm``)."""
        self.info.update(values)


class Method:
    """Base class: a method with no noise and no hyperparameters; subclasses set ``name`` and ``loss``."""

    name: ClassVar[str] = "?"
    Config: ClassVar[type | None] = None
    moved_keys: ClassVar[dict[str, str]] = {}
    absent_means: ClassVar[dict[str, Any]] = {}
    needs_noise: ClassVar[bool] = False
    rebuild_on_resume: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        """``config``: an instance of ``Config`` (its defaults when None)."""
        self.config = config if config is not None or self.Config is None else self.Config()

    def learns_noise(self) -> bool:
        """Whether ``prepare`` learns the round's NS noise (``ctx.ns_noise()``) with these settings;
        ``needs_noise`` by default (a method whose settings can do without overrides it)."""
        return self.needs_noise

    def prepare(self, ctx: RoundContext) -> torch.Tensor | None:
        """The round's noise (N, D) for ``loss``, or None."""
        return None

    def loss(self, parts, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None):
        """(scalar loss, {name: detached scalar}) for one batch x (B, C, H, W) in [0, 1], labels y (B,)."""
        raise NotImplementedError


def own_draws_per_rank(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with each torchrun rank drawing its own random numbers from torch's global
    generators (an attack's random start, the model's dropout and drop-path masks), while every
    rank's generator ends where the others' do.

    Every rank is seeded alike and a checkpoint keeps rank 0's generator for all, so without this
    the ranks drew the same PGD random start, and the same dropout masks, for their different
    slices of the batch. The finetuning step runs each loss through it; pgd and trades also run
    their attack through it, for callers of ``Method.loss`` outside the engine. Here one
    seed is drawn from the shared generator (the same on every rank, so they stay in step and a
    resume replays it), and ``fn`` runs on a forked generator seeded from it and the rank. In one
    process ``fn`` runs as it is, on the shared generator."""
    from ...distributed import rank_world

    rank, world = rank_world()
    if world == 1:
        return fn(*args)
    seed = int(torch.randint(0, 2**62, (1,)))
    devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + rank) % 2**63)
        return fn(*args)


def check_attack_config(where: str, eps: float, alpha: float, steps: int) -> None:
    """Refuse an attack radius, step size or step count that cannot be meant (the L∞ radius is in
    pixels of [0, 1]: above 1 it covers every image, e.g. 300 for 300/255)."""
    from ...errors import NsvitError

    if not 0 <= eps <= 1:
        raise NsvitError(f"{where}.eps must be in [0, 1] (an L∞ radius in [0, 1] pixels: 8/255, not 8), got {eps}")
    if not alpha > 0:
        raise NsvitError(f"{where}.alpha must be > 0, got {alpha}")
    if int(steps) < 1:
        raise NsvitError(f"{where}.steps must be >= 1, got {steps}")

"""Accuracy under adversarial attacks, in pixel space [0, 1]: one registry of attacks, one loop.

An attack is an ``AttackSpec``: a factory ``(parts, seed=..., **settings) -> attack`` where the
attack is a callable ``(images, labels) -> adversarial images`` (a torchattacks ``Attack``), with
its settings and their defaults written here once. ``attack_accuracy`` is the one loop that runs
any of them: seeded, batched, the model in eval mode and given back in its own mode.

The official code fed torchattacks normalised tensors although torchattacks expects (and clamps
to) pixels in [0, 1]; here the adapter normalises inside the model, so attacks see pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import MAX_NOISE_SCALE, NsvitError
from ..extras import load_torchattacks
from .accuracy import eval_mode, top1


@dataclass(frozen=True)
class AttackSpec:
    """One attack: how to build it and its settings.

    Attributes:
        factory: ``(parts, seed=int, **kw) -> attack``; the attack maps (images (B, C, H, W) in
            [0, 1], labels (B,)) to adversarial images of the same shape, in [0, 1].
        defaults: the settings a user may change (``fgsm:eps=4/255``), with their defaults; they
            name the result in a report. ``n`` is the loop's: attack only ``n`` images, spread
            evenly over the set (every class of a class-sorted folder, not its first ones).
            Each numeric setting needs a range in :data:`SETTING_RANGES` (a test holds every suite to it).
        fixed: constructor arguments that are not settings (PGD's random start).
        batch_size: images per attack call.
        help: one line for ``eval --help`` and the suite list.
        norm: "Linf" where ``eps`` is an L-inf radius on pixels in [0, 1] (refused above 1).

    A new attack is one entry in :data:`ATTACKS`; ``nsvit_fast.eval.suite`` makes it a suite of
    the same name. Its report column is labelled by that name. From outside the package,
    :func:`nsvit_fast.eval.register_attack` adds one at run time.
    """

    factory: Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    defaults: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256
    help: str = ""
    norm: str | None = None


class FloatLogits(torch.nn.Module):
    """``parts`` with its logits cast to float32: under ``--precision bf16`` autocast gives bf16
    logits, which torchattacks' APGD-T hands to numpy (``Got unsupported ScalarType BFloat16``).
    The forward itself keeps the autocast precision.

    It takes ``parts``' mode when made (eval inside the suites): torchattacks puts back the mode it
    found its model in after each call, and a new Module is in train mode, so ``model.train()``
    reached ``parts`` too and the accuracy after the attack was scored with dropout and drop-path on
    (FGSM at eps 0 gave 0.89, not 1.0). Make the attack after setting the model's mode."""

    def __init__(self, parts):
        super().__init__()
        self.parts = parts
        self.train(parts.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x).float()


def from_torchattacks(cls: str, seeded: bool = False, classes: bool = False):
    """An :class:`AttackSpec` factory for torchattacks' class ``cls`` (``"MIFGSM"``): the attack is
    built on the model with float32 logits; ``seeded`` attacks take the run's seed themselves
    (AutoAttack), ``classes`` ones the model's class count. A class torchattacks lacks is an
    NsvitError when the attack is built."""

    def make(parts, seed: int = 0, **kw):
        if seeded:
            kw.setdefault("seed", seed)
        if classes:
            kw.setdefault("n_classes", parts.num_classes)
        ta = load_torchattacks()
        if not hasattr(ta, cls):
            raise NsvitError(f"torchattacks {getattr(ta, '__version__', '')} has no attack {cls!r}")
        return getattr(ta, cls)(FloatLogits(parts), **kw)

    return make


def _patchfool(parts, seed: int = 0, **kw):
    """The authors' Patch-Fool (a torchattacks Attack), seeded once for all batches."""
    from .patchfool import PatchFool

    return PatchFool(parts, seed=seed, **kw)


def _patchfool_lite(parts, seed: int = 0, **kw):
    """patchfool_lite as an attack (images, labels) -> adversarial images: one generator seeded once
    and drawn from batch after batch (nsvit_fast.eval.patchfool)."""
    from .patchfool import patchfool_lite

    g = torch.Generator().manual_seed(seed)
    return lambda x, y: patchfool_lite(parts, x, y, generator=g, **kw)


# PatchFool's settings with its authors' defaults. Written here as well as in PatchFool's signature
# because reading the class imports torchattacks (and scipy), ~0.7 s on every command that imports
# nsvit_fast.eval, --help included; tests/test_patchfool.py checks the two agree.
PATCHFOOL_DEFAULTS: dict[str, Any] = {"num_patch": 1, "patch_select": "attn", "atten_select": 4,
                                      "attack_mode": "attention", "atten_loss_weight": 0.002, "lr": 0.22,
                                      "steps": 250, "step_size": 10, "gamma": 0.95}
# batch 64 as the authors' main.py: their PCGrad divides by ||g_ce|| once, so its correction scales
# with the per-image CE gradient (1 / batch for a batch-mean loss), and the batch changes the attack
PATCHFOOL = AttackSpec(_patchfool, PATCHFOOL_DEFAULTS, batch_size=64,
                       help="Patch-Fool as its authors wrote it (Fu et al., ICLR 2022): attention-aware adversarial "
                            "patch")
PATCHFOOL_LITE = AttackSpec(_patchfool_lite, {"n_patches": 1, "steps": 30}, batch_size=128,
                            help="this project's faster patch attack, not Patch-Fool: Adam in pixel space, 30 steps")


ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(from_torchattacks("FGSM"), {"eps": 1 / 255}, norm="Linf",  # the paper's setting
                       help="FGSM, L-inf (eps 1/255 is the paper's); torchattacks"),
    "pgd": AttackSpec(from_torchattacks("PGD"), {"eps": 4 / 255, "alpha": 1 / 255, "steps": 10}, {"random_start": True},
                      norm="Linf", help="PGD, L-inf, random start; torchattacks"),
    "pgd_l2": AttackSpec(from_torchattacks("PGDL2"), {"eps": 0.5, "alpha": 0.1, "steps": 10}, {"random_start": True},
                         norm="L2", help="PGD, L2, random start; torchattacks"),
    "cw": AttackSpec(from_torchattacks("CW"), {"c": 1.0, "kappa": 0.0, "steps": 50, "lr": 0.01}, norm="L2",
                     help="CW-L2; torchattacks"),
    "autoattack": AttackSpec(from_torchattacks("AutoAttack", seeded=True, classes=True), {"eps": 4 / 255, "n": 64},
                             {"norm": "Linf", "version": "standard"}, norm="Linf",
                             help="AutoAttack standard, L-inf, on n images spread over the set; torchattacks"),
    "patchfool": PATCHFOOL,
    "patchfool_lite": PATCHFOOL_LITE,
}


def _spec(attack: str | AttackSpec) -> AttackSpec:
    if isinstance(attack, AttackSpec):
        return attack
    if attack not in ATTACKS:
        raise NsvitError(f"unknown attack {attack!r} (attacks: {', '.join(ATTACKS)})")
    return ATTACKS[attack]


# each numeric setting's kind and range: ("count", lo) a whole number in [lo, MAX_COUNT]; ("number", lo,
# open, hi) a finite number > lo (open) or >= lo, and <= hi. Unlisted numeric settings must be finite.
# The upper bounds keep the attacks' float32 arithmetic finite, far past any sensible value:
SETTING_RANGES: dict[str, tuple] = {
    "steps": ("count", 1), "n": ("count", 1), "num_patch": ("count", 1), "n_patches": ("count", 1),
    "step_size": ("count", 1), "atten_select": ("count", 0),
    # L2 radius and step (pgd_l2; L-inf eps is <= 1, check_linf_eps): [0, 1]^(3 x 224 x 224) is 388 across,
    # 1e4 is a 5800-px image's; at 1e30 the delta's norm overflowed and PGD-L2 gave back the clean images
    "eps": ("number", 0, False, 1e4), "alpha": ("number", 0, True, 1e4),
    # CW: torchattacks stops at step 0 with the clean images once c x the batch's summed logit margins
    # tops 1e10 (c=1e8 scored clean accuracy on digits); 1e4 x 256 images x a margin of 30 stays far below
    "c": ("number", 0, True, 1e4),
    # a logit margin: past any model's logit gap it changes nothing (1e308 did not fit float32)
    "kappa": ("number", 0, False, 1e6),
    # Adam moves each coordinate by about lr; CW's tanh space and PatchFool's normalised pixels span a
    # few units, so 1e6 saturates in one step and stays finite (1e300 did not fit float32)
    "lr": ("number", 0, True, 1e6),
    # Adam normalises the step: the weight only sets the attention term's share
    "atten_loss_weight": ("number", 0, False, 1e6),
    # StepLR multiplies lr by gamma every step_size steps: above 1 the lr grows without bound with steps
    "gamma": ("number", 0, True, 1.0),
    # nullspace noise norm / image norm: float32 round-off past it (1e7 matched 81%, 1e20 25%, 1e30 NaN)
    "scale": ("number", 0, True, MAX_NOISE_SCALE),
}


def check_settings(what: str, kw: dict[str, Any], defaults: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """``kw`` checked against an attack's or suite's ``defaults``: a word where the default is a word,
    else a finite number (not a bool) in its :data:`SETTING_RANGES` range, counts as ints; a key
    outside ``defaults`` is refused if ``strict``, else passed on unchecked. Returns the checked
    settings; raises NsvitError naming the first bad one."""
    from ..errors import check_count, check_number

    out = {}
    for k, v in kw.items():
        if k not in defaults:
            if not strict:
                out[k] = v
                continue
            raise NsvitError(f"{what} has no setting {k!r}" + (f" (settings: {', '.join(defaults)})" if defaults else ""))
        if isinstance(defaults[k], str):
            if not isinstance(v, str):
                raise NsvitError(f"{what}: {k} must be a word, got {v!r}")
            out[k] = v
            continue
        rule = SETTING_RANGES.get(k)
        try:
            if rule and rule[0] == "count":
                out[k] = check_count(f"{what}: {k}", v, rule[1])
            elif rule:
                out[k] = check_number(f"{what}: {k}", v, lo=rule[1], lo_open=rule[2], hi=rule[3])
            else:
                out[k] = check_number(f"{what}: {k}", v)
        except OverflowError:  # an int past float's range (10**400)
            raise NsvitError(f"{what}: {k} must be a finite number, got an integer past float's range") from None
    return out


def check_linf_eps(name: str, kw: dict[str, Any], norm: str | None) -> None:
    """Refuse an ``eps`` above 1 for an attack of ``norm`` "Linf" (AutoAttack unless given
    norm="L2"): every pixel may then take any value, and "eps=8" meant 8/255 (the finetuning
    methods refuse it the same way)."""
    eps = kw.get("eps")
    if norm == "Linf" and kw.get("norm", "Linf") == "Linf" and isinstance(eps, (int, float)) and eps > 1:
        raise NsvitError(f"{name}: eps={eps:g} is an L-inf radius on pixels in [0, 1], so it must be <= 1 "
                         f"(8/255, not 8)")


def make_attack(parts, attack: str | AttackSpec, seed: int = 0, **kw):
    """Build ``attack`` (a name in ATTACKS, ``patchfool`` and ``patchfool_lite`` included, or an
    AttackSpec) on ``parts`` with its defaults updated by ``kw``; returns a callable (images,
    labels) -> adversarial images. The loop setting ``n`` is ignored here. Raises NsvitError for an
    unknown attack, or a setting it does not have or out of range (:func:`check_settings`: eps >= 0,
    steps >= 1, alpha > 0, each below its upper bound)."""
    spec = _spec(attack)
    what = "attack " + (attack if isinstance(attack, str) else next((k for k, v in ATTACKS.items() if v is spec),
                                                                   "spec"))
    # the settings are checked; other keys go to the attack's constructor (n_classes, torchattacks' own)
    kw = check_settings(what, kw, {"n": None, **spec.defaults}, strict=False)
    kw = {**spec.fixed, **spec.defaults, **kw}
    check_linf_eps(what.removeprefix("attack "), kw, spec.norm)
    kw.pop("n", None)
    try:
        return spec.factory(parts, seed=seed, **kw)
    except TypeError as e:  # an argument the constructor does not take (epsilon= for eps=)
        raise NsvitError(f"{what}: {e} (settings: {', '.join(spec.defaults)})") from None


def attack_accuracy(parts, images: torch.Tensor, labels: torch.Tensor, attack: str | AttackSpec,
                    batch_size: int | None = None, seed: int = 0, **kw) -> float:
    """Top-1 accuracy (a fraction) on the adversarial images that ``attack`` (a name in ATTACKS,
    ``patchfool`` and ``patchfool_lite`` included, or an AttackSpec, settings ``kw`` over its
    defaults) makes from ``images`` (B, C, H, W) in [0, 1] and ``labels`` (B,). With the setting
    ``n``, only ``n`` images, spread evenly over them. Seeded: the global torch RNG is seeded with
    ``seed`` and restored afterwards; the model runs in eval mode and is given back in its own mode,
    also when the attack raises. Raises NsvitError as make_attack does, and for images that are not
    float pixels in [0, 1], labels that are not class indices below the model's outputs, one per
    image, a batch_size < 1 or a seed outside [0, 2**32 - 1]."""
    from ..errors import check_labels
    from .source import TensorImages

    data = TensorImages(images, labels)  # checks the pixels and labels once
    check_labels("labels", data.labels, None, getattr(parts, "num_classes", None) or None)  # and the label range
    return attack_accuracy_on(parts, data, attack, batch_size, seed, **kw)


def attack_accuracy_on(parts, data, attack: str | AttackSpec, batch_size: int | None = None, seed: int = 0,
                       *, progress: bool = False, desc: str | None = None, **kw) -> float:
    """:func:`attack_accuracy` over an :class:`~nsvit_fast.eval.source.EvalImages` (in memory or a
    streamed folder): the attack runs batch by batch and the hits are summed, so a folder of any
    size is attacked holding one batch; ``progress``: a per-batch bar (named ``desc``) on a terminal.
    Returns the accuracy as a fraction; NsvitError on no images."""
    from ..errors import check_count, check_seed
    from .source import progress_bar

    spec = _spec(attack)
    name = attack if isinstance(attack, str) else next((k for k, v in ATTACKS.items() if v is spec), "spec")
    kw = check_settings("attack " + name, kw, {"n": None, **spec.defaults}, strict=False)
    n = kw.get("n", spec.defaults.get("n"))
    if kw.get("n") is not None and kw["n"] > len(data):  # asked for, not the default: say it was cut
        import warnings

        warnings.warn(f"attack {name}: n={kw['n']} but there are {len(data)} image(s): all {len(data)} are "
                      f"attacked", stacklevel=2)
    batch_size = spec.batch_size if batch_size is None else check_count("batch_size", batch_size)
    seed = check_seed("seed", seed)
    dev = next(parts.parameters()).device
    state = torch.get_rng_state()
    hits = seen = 0
    try:
        with eval_mode(parts):
            atk = make_attack(parts, spec, seed=seed, **kw)
            torch.manual_seed(seed)
            todo = len(data) if n is None else min(int(n), len(data))
            for x, y in progress_bar(data.batches(batch_size, None if n is None else int(n)),
                                     -(-todo // batch_size), desc or name, progress):
                x, y = x.to(dev), y.to(dev)
                x_adv = atk(x, y)  # needs gradients: outside no_grad
                with torch.no_grad():
                    hits += int((top1(parts(x_adv)) == y).sum())
                seen += len(y)
    finally:
        torch.set_rng_state(state)
    if seen == 0 and todo:  # a streamed folder's n picks, all unreadable under on_bad_image skip
        raise NsvitError(f"attack {name}: the {todo} image(s) picked for n={todo} were all unreadable (skipped); "
                         f"give a larger n or remove the unreadable files")
    if seen == 0:
        raise NsvitError("accuracy of an empty image set is undefined")
    if n is not None and seen < todo:  # a streamed folder's unreadable files, skipped after the spread
        import warnings

        warnings.warn(f"attack {name}: {todo - seen} of the n={todo} images picked were unreadable (skipped): "
                      f"{seen} attacked", stacklevel=2)
    return hits / seen

"""evaluate(): the paper's robustness suites on any adapter, batched and seeded, into a Report.

Suites (``name`` or ``name:key=value,...`` to change a setting):

    clean        top-1 accuracy
    fgsm         FGSM L-inf, eps 1/255 (the paper's)                         torchattacks
    pgd          PGD L-inf, eps 4/255, step 1/255, 10 steps, random start    torchattacks
    pgd_l2       PGD L2, eps 0.5, step 0.1, 10 steps                          torchattacks
    cw           CW-L2, c 1, kappa 0, 50 steps, lr 0.01                       torchattacks
    autoattack   AutoAttack standard, L-inf eps 4/255, on the first ``n`` images (default 64)
    patchfool    Patch-Fool as its authors wrote it: 1 patch chosen by block-4 attention, attention-aware
                 loss with PCGrad, Adam 0.22 + StepLR(10, 0.95), 250 steps (nsvit_fast.eval.patchfool)
    patchfool_lite  this project's faster patch attack, not Patch-Fool: 1 patch, 30 steps
    corruptions  15 corruptions x 5 severities on the fly; per-severity accuracy, mean corruption
                 accuracy and mCE (AlexNet reference on 1000-class models, else the baseline model)
    nullspace    exact patch-embedding nullspace noise at 10x the image norm: match rate, MSE-prob
    noisebank    a NoiseBank's noises: match rate, MSE-prob (``bank=``)
    imagenet-a, imagenet-r, imagenet-v2, imagenet-sketch, stylized, damagenet, imagenet-c
                 folders given in ``folders={suite: path}``

Every model sees the same images and seeds; corrupted images are made once per (corruption,
severity) and reused across models.
"""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Any

import torch

from ..errors import NsvitError
from ..models.registry import adapt
from .attacks import accuracy, attack_accuracy
from .corruptions import CORRUPTIONS, SEVERITIES, CorruptionSet, mce, mce_imagenet
from .ood import SUITES as OOD_SUITES
from .ood import folder_accuracy
from .report import APPROX_ALEXNET, Report

ATTACK_DEFAULTS = {
    "fgsm": ("fgsm", {"eps": 1 / 255}),
    "pgd": ("pgd", {"eps": 4 / 255, "alpha": 1 / 255, "steps": 10}),
    "pgd_l2": ("pgd_l2", {"eps": 0.5, "alpha": 0.1, "steps": 10}),
    "cw": ("cw", {"c": 1.0, "kappa": 0.0, "steps": 50, "lr": 0.01}),
    "autoattack": ("autoattack", {"eps": 4 / 255, "n": 64}),
    "patchfool": (None, {"num_patch": 1, "patch_select": "attn", "atten_select": 4, "attack_mode": "attention",
                         "atten_loss_weight": 0.002, "lr": 0.22, "steps": 250, "step_size": 10, "gamma": 0.95}),
    "patchfool_lite": (None, {"n_patches": 1, "steps": 30}),
}
SUITES = ["clean", *ATTACK_DEFAULTS, "corruptions", "nullspace", "noisebank", *OOD_SUITES, "imagenet-c"]


def _num(v: str):
    v = v.strip()
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(Fraction(v))
    except (ValueError, ZeroDivisionError):
        raise NsvitError(f"setting value {v!r} is not a number (use 4/255 or 0.0157)") from None


def parse_suite(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fgsm:eps=4/255"`` -> ("fgsm", {"eps": 0.0157}); unknown suites and keys are errors."""
    name, _, rest = spec.strip().partition(":")
    if name not in SUITES:
        import difflib

        near = difflib.get_close_matches(name, SUITES, n=1)
        raise NsvitError(f"unknown suite {name!r}" + (f" (did you mean {near[0]!r}?)" if near else
                                                    f" (suites: {', '.join(SUITES)})"))
    kw: dict[str, Any] = {}
    defaults = ATTACK_DEFAULTS.get(name, (None, {}))[1]
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        if not eq:
            raise NsvitError(f"suite setting {part!r} must be key=value")
        k = k.strip()  # a setting whose default is a word (patchfool's attack_mode) takes a word
        kw[k] = v.strip() if isinstance(defaults.get(k), str) else _num(v)
    bad = [k for k in kw if k not in defaults]
    if bad:
        raise NsvitError(f"suite {name} has no setting {bad[0]!r}" + (f" (settings: {', '.join(defaults)})" if defaults else ""))
    if kw.get("eps", 0) < 0:
        raise NsvitError(f"eps must be >= 0, got {kw['eps']}")
    return name, {**defaults, **kw}


def fmt_setting(kw: dict[str, Any]) -> str:
    def f(v):
        if isinstance(v, float) and 0 < v < 1 and abs(v * 255 - round(v * 255)) < 1e-6:
            return f"{round(v * 255)}/255"
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={f(v)}" for k, v in kw.items())


def _attack_acc(parts, name: str, kw: dict, x, y, seed: int) -> float:
    if name == "patchfool":
        from .patchfool import PatchFool

        atk = PatchFool(parts, seed=seed, **kw)
        dev = next(parts.parameters()).device
        hits = 0
        for i in range(0, len(y), 128):
            xa = atk(x[i:i + 128].to(dev), y[i:i + 128].to(dev))
            with torch.no_grad():
                hits += int((parts(xa).argmax(-1).cpu() == y[i:i + 128]).sum())
        return hits / len(y)
    if name == "patchfool_lite":
        from .patchfool import patchfool_lite

        g = torch.Generator().manual_seed(seed)
        dev = next(parts.parameters()).device
        was = parts.training
        parts.eval()
        hits = 0
        for i in range(0, len(y), 128):
            xa = patchfool_lite(parts, x[i:i + 128].to(dev), y[i:i + 128].to(dev), generator=g, **kw)
            hits += int((parts(xa).argmax(-1).cpu() == y[i:i + 128]).sum())
        parts.train(was)
        return hits / len(y)
    kw = dict(kw)
    if name == "autoattack":
        n = int(kw.pop("n"))
        x, y = x[:n], y[:n]
        kw.update(n_classes=parts.num_classes)
    return attack_accuracy(parts, x, y, ATTACK_DEFAULTS[name][0], seed=seed, **kw)


def evaluate(models, data, suites=("clean", "fgsm"), seed: int = 0, *, baseline: str | None = None,
             folders: dict[str, str] | None = None, bank=None, model_classes: list[str] | None = None,
             mce_reference: str = "auto", max_images: int | None = None, progress: bool = True,
             log=None) -> Report:
    """Evaluate one model (adapter or timm ViT) or several ({name: model}) on ``data`` (ImageDataset,
    pixels in [0, 1]) and the named suites; returns a Report.

    Args:
        baseline: the model (a key of ``models``) whose corruption errors normalise mCE on non-ImageNet
            data; default the first model (pass the un-finetuned model first).
        folders: paths of the folder suites, e.g. {"imagenet-r": "/data/imagenet-r"}.
        bank: a NoiseBank for the ``noisebank`` suite.
        mce_reference: "alexnet", "baseline" or "auto" (AlexNet for 1000-class models).
    """
    if not isinstance(models, dict):
        models = {getattr(models, "name", "model"): models}
    models = {k: adapt(m) for k, m in models.items()}
    specs = [parse_suite(s) for s in suites]
    folders = dict(folders or {})
    x, y = data.images, data.labels
    if max_images:
        x, y = x[:max_images], y[:max_images]
    names = list(models)
    baseline = baseline or names[0]
    if baseline not in models:
        raise NsvitError(f"baseline {baseline!r} is not one of the evaluated models {names}")
    for suite, _ in specs:
        if (suite in OOD_SUITES or suite == "imagenet-c") and suite not in folders:
            raise NsvitError(f"suite {suite} needs its folder: folders={{'{suite}': PATH}} (--folder {suite}=PATH)")
        if suite == "noisebank" and bank is None:
            raise NsvitError("suite noisebank needs a NoiseBank (bank=..., --bank FILE)")
    say = log or (print if progress else (lambda *_: None))
    report = Report()
    corrupted = CorruptionSet(x, seed) if any(s == "corruptions" for s, _ in specs) else None
    corr_err: dict[str, dict[str, list[float]]] = {}
    # the baseline first: its corruption errors normalise everyone's mCE
    for name in sorted(names, key=lambda n: n != baseline):
        parts = models[name]
        for suite, kw in specs:
            t0 = time.perf_counter()
            setting = fmt_setting(kw)
            if suite == "clean":
                report.add(name, seed, suite, "", "acc", 100 * accuracy(parts, x, y))
            elif suite in ATTACK_DEFAULTS:
                report.add(name, seed, suite, setting, "acc", 100 * _attack_acc(parts, suite, kw, x, y, seed))
            elif suite == "corruptions":
                err = {}
                for c in CORRUPTIONS:
                    err[c] = []
                    for s in SEVERITIES:
                        acc = accuracy(parts, corrupted.get(c, s), y)
                        report.add(name, seed, suite, f"{c}@{s}", "acc", 100 * acc)
                        err[c].append(1 - acc)
                corr_err[name] = err
                mean_acc = 100 * (1 - sum(map(sum, err.values())) / (len(CORRUPTIONS) * len(SEVERITIES)))
                report.add(name, seed, "corruption_acc", "", "acc", mean_acc)
                ref = mce_reference if mce_reference != "auto" else ("alexnet" if parts.num_classes == 1000 else "baseline")
                value = mce_imagenet(err) if ref == "alexnet" else mce(err, corr_err[baseline])
                # AlexNet's errors come from the original ImageNet-C files, not these corruptions
                report.add(name, seed, suite, f"ref={APPROX_ALEXNET if ref == 'alexnet' else baseline}", "mce", value)
            elif suite == "nullspace":
                from .nullspace_metrics import exact_noise_effect

                r = exact_noise_effect(parts, x, seed=seed)
                for k, v in r.items():
                    report.add(name, seed, suite, "scale=10", k, 100 * v if k == "match_rate" else v)
            elif suite == "noisebank":
                from .nullspace_metrics import bank_effect

                r = bank_effect(parts, bank, x)
                report.add(name, seed, suite, f"eps={bank.meta.get('eps')}", "match_rate", 100 * r["match_rate"])
                report.add(name, seed, suite, f"eps={bank.meta.get('eps')}", "mse_prob", r["mse_prob"])
            elif suite == "imagenet-c":
                from pathlib import Path

                err = {}
                root = Path(folders[suite])
                for c in CORRUPTIONS:
                    for s in SEVERITIES:
                        d = root / c / str(s)
                        if d.is_dir():
                            acc = folder_accuracy(parts, d, f"imagenet-c/{c}/{s}", model_classes, max_images=max_images)
                            report.add(name, seed, "corruptions", f"{c}@{s}", "acc", 100 * acc)
                            err.setdefault(c, []).append(1 - acc)
                if not err:
                    raise NsvitError(f"imagenet-c: no <corruption>/<severity> folders under {root}")
                corr_err[name] = err
                report.add(name, seed, "corruptions", "ref=alexnet", "mce", mce_imagenet(err))
            else:  # OOD folders
                acc = folder_accuracy(parts, folders[suite], suite, model_classes, max_images=max_images)
                report.add(name, seed, suite, "", "acc", 100 * acc)
            say(f"  {name} {suite}{':' + setting if setting else ''}: {time.perf_counter() - t0:.1f} s")
    return report

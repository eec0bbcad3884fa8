"""evaluate(): the paper's robustness suites on any adapter, batched and seeded, into a Report.

``SUITES`` is the registry: one ``Suite`` per name, holding its runner, its settings with their
defaults, and what it needs (a folder, a NoiseBank). ``suite_help()`` lists them all, settings
included. A suite is named as ``name`` or ``name:key=value,...`` to change a setting:

    clean        top-1 accuracy
    fgsm, pgd, pgd_l2, cw, autoattack
                 accuracy under the attack of that name in ``attacks.ATTACKS`` (torchattacks),
                 its defaults written there once (FGSM's eps 1/255 is the paper's)
    patchfool    Patch-Fool as its authors wrote it: 1 patch chosen by block-4 attention, attention-aware
                 loss with PCGrad, Adam 0.22 + StepLR(10, 0.95), 250 steps (nsvit_fast.eval.patchfool),
                 through the same attack loop
    patchfool_lite  this project's faster patch attack, not Patch-Fool: 1 patch, 30 steps
    corruptions  15 corruptions x 5 severities on the fly; per-severity accuracy, mean corruption
                 accuracy and mCE (AlexNet reference on 1000-class models, else the baseline model)
    nullspace    exact patch-embedding nullspace noise at ``scale`` x the image norm: match rate, MSE-prob
    noisebank    a NoiseBank's noises: match rate, MSE-prob (``bank=``)
    imagenet-a, imagenet-r, imagenet-v2, imagenet-sketch, stylized, damagenet, imagenet-c
                 folders given in ``folders={suite: path}``

A new suite is one ``Suite`` entry; a new attack one ``AttackSpec`` (a factory ``(parts, seed=...,
**settings)`` returning an attack ``(images, labels) -> adversarial images``, and its defaults).
Every model sees the same images and seeds. The images come through one
:class:`~nsvit_fast.eval.source.EvalImages`: in memory, or a folder streamed batch by batch through
the model's eval transform (never read whole), with the same numbers either way. In memory,
corrupted images are made once per (corruption, severity) and reused across models; streamed, each
batch is corrupted as it passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.base import check_labels_fit
from ..errors import NsvitError
from ..models.registry import adapt
from .accuracy import eval_mode, top1
from .attacks import ATTACKS, SETTING_RANGES, AttackSpec, attack_accuracy_on, check_linf_eps, check_settings
from .corruptions import CORRUPTIONS, SEVERITIES, CorruptionSet, corrupt, mce, mce_imagenet
from .ood import SUITES as OOD_SUITES
from .ood import PRECROPPED, check_folder, folder_accuracy, model_class_names
from .report import APPROX_ALEXNET, PARTIAL_C, Report
from .source import EvalImages, FolderImages, TensorImages, as_eval_images, progress_bar

ACC_BATCH = 512  # images per forward for clean and corrupted accuracy


@dataclass
class Run:
    """What every suite of one ``evaluate`` call shares: the images, seed, report and options.

    ``data`` hands out the images in batches (in memory or streamed). ``corr_err`` collects each
    model's corruption errors (model -> corruption -> per severity), so the baseline's normalise the
    others' mCE; ``corrupted`` holds the corrupted images of in-memory data, made once. ``progress``:
    the suites show a per-batch bar on a terminal.
    """

    report: Report
    data: EvalImages
    seed: int
    baseline: str
    folders: dict[str, str]
    bank: Any = None
    model_classes: list[str] | None = None
    mce_reference: str = "auto"
    max_images: int | None = None
    on_bad_image: str = "error"
    corrupted: CorruptionSet | None = None
    corr_err: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    progress: bool = False

    @property
    def images(self) -> torch.Tensor:
        """All images (N, C, H, W) of in-memory data; a streamed folder has none (use ``data.batches``)."""
        return self._tensors().images

    @property
    def labels(self) -> torch.Tensor:
        """All labels (N,) of in-memory data; a streamed folder has none (use ``data.batches``)."""
        return self._tensors().labels

    def _tensors(self) -> TensorImages:
        if not isinstance(self.data, TensorImages):
            raise NsvitError("this suite needs the images in memory; a streamed folder is read batch by batch "
                             "(run.data.batches(batch_size)); pass nsvit_fast.data.load_data's ImageDataset instead")
        return self.data


@dataclass(frozen=True)
class Suite:
    """One suite: ``run(run, model_name, parts, settings)`` adds its records to ``run.report``.

    Attributes:
        run: the runner; ``settings`` are ``defaults`` updated by the user's ``name:key=value``.
        defaults: the settings the suite takes, with their defaults (empty: it takes none).
        needs: "folder" (a path in ``folders``) or "bank" (a NoiseBank), checked before any model runs.
        help: what it measures, one line (its settings are listed from ``defaults``).
        norm: an attack suite's norm ("Linf": eps is refused above 1).
    """

    run: Callable[[Run, str, Any, dict[str, Any]], None]
    defaults: dict[str, Any] = field(default_factory=dict)
    needs: str | None = None
    help: str = ""
    norm: str | None = None


@torch.no_grad()
def batch_accuracy(parts, batches) -> float:
    """Top-1 accuracy (a fraction) over (x, y) batches, each moved to the model's device; the caller
    holds eval mode. Raises NsvitError on no images."""
    dev = next(parts.parameters()).device
    hits = seen = 0
    for x, y in batches:
        hits += int((top1(parts(x.to(dev))).cpu() == y.cpu()).sum())
        seen += len(y)
    if seen == 0:
        raise NsvitError("accuracy of an empty image set is undefined")
    return hits / seen


def _clean(run: Run, model: str, parts, kw: dict) -> None:
    batches = progress_bar(run.data.batches(ACC_BATCH), -(-len(run.data) // ACC_BATCH), "clean", run.progress)
    run.report.add(model, run.seed, "clean", "", "acc", 100 * batch_accuracy(parts, batches))


def _attack_suite(suite: str, spec: AttackSpec) -> Suite:
    """A suite that reports accuracy under ``spec``'s attack, through the one attack loop."""

    def go(run: Run, model: str, parts, kw: dict) -> None:
        acc = attack_accuracy_on(parts, run.data, spec, seed=run.seed, progress=run.progress, desc=suite, **kw)
        run.report.add(model, run.seed, suite, fmt_setting(kw), "acc", 100 * acc)

    return Suite(go, spec.defaults, help=spec.help, norm=spec.norm)


def _corruption_accuracies(run: Run, parts) -> dict[tuple[str, int], float]:
    """Accuracy per (corruption, severity). In memory: the corrupted sets made once for every model.
    Streamed: one pass over the folder, each batch corrupted 75 ways as it passes. The corruption
    of an image depends on its index only (``corrupt``'s ``start``), so both give the same images."""
    if isinstance(run.data, TensorImages):
        if run.corrupted is None:
            run.corrupted = CorruptionSet(run.data.images, run.seed)
        labels = run.data.labels
        keys = [(c, s) for c in CORRUPTIONS for s in SEVERITIES]  # one bar step per corrupted set
        return {(c, s): batch_accuracy(parts, TensorImages(run.corrupted.get(c, s), labels).batches(ACC_BATCH))
                for c, s in progress_bar(keys, len(keys), "corruptions", run.progress)}
    dev = next(parts.parameters()).device
    hits = {(c, s): 0 for c in CORRUPTIONS for s in SEVERITIES}
    seen = 0
    with torch.no_grad():
        for x, y in progress_bar(run.data.batches(ACC_BATCH), -(-len(run.data) // ACC_BATCH), "corruptions",
                                 run.progress):
            for key in hits:
                pred = top1(parts(corrupt(x, *key, seed=run.seed, start=seen).to(dev))).cpu()
                hits[key] += int((pred == y).sum())
            seen += len(y)
    if seen == 0:
        raise NsvitError("accuracy of an empty image set is undefined")
    return {key: h / seen for key, h in hits.items()}


def _corruptions(run: Run, model: str, parts, kw: dict) -> None:
    accs = _corruption_accuracies(run, parts)
    err = {}
    for c in CORRUPTIONS:
        err[c] = []
        for s in SEVERITIES:
            acc = accs[(c, s)]
            run.report.add(model, run.seed, "corruptions", f"{c}@{s}", "acc", 100 * acc)
            err[c].append(1 - acc)
    run.corr_err[model] = err
    mean_acc = 100 * (1 - sum(map(sum, err.values())) / (len(CORRUPTIONS) * len(SEVERITIES)))
    run.report.add(model, run.seed, "corruption_acc", "", "acc", mean_acc)
    ref = run.mce_reference
    if ref == "auto":
        ref = "alexnet" if parts.num_classes == 1000 else "baseline"
    if ref != "alexnet":
        flawless = [c for c, e in run.corr_err[run.baseline].items() if sum(e) == 0]
        if flawless:  # CE_c divides by the baseline's errors: undefined, and known only after every suite ran
            import warnings

            warnings.warn(f"corruptions: no mCE relative to {run.baseline}, which makes no error on {flawless[0]} "
                          f"on these images (more images give it errors); mean corruption accuracy only", stacklevel=2)
            return
    value = mce_imagenet(err) if ref == "alexnet" else mce(err, run.corr_err[run.baseline])
    # AlexNet's errors come from the original ImageNet-C files, not these corruptions: approximate
    run.report.add(model, run.seed, "corruptions", f"ref={APPROX_ALEXNET if ref == 'alexnet' else run.baseline}",
                   "mce", value)


def _nullspace(run: Run, model: str, parts, kw: dict) -> None:
    from ..runtime import exact_math
    from .nullspace_metrics import exact_noise_effect

    with exact_math():  # a property of the weights: fp32 whatever --precision says
        r = exact_noise_effect(parts, run.data, seed=run.seed, progress=run.progress, **kw)
    for k, v in r.items():
        run.report.add(model, run.seed, "nullspace", fmt_setting(kw), k, 100 * v if k == "match_rate" else v)


def _noisebank(run: Run, model: str, parts, kw: dict) -> None:
    import warnings

    from .nullspace_metrics import bank_effect

    with warnings.catch_warnings(record=True) as said:  # "learned on other weights": which row's?
        warnings.simplefilter("always")
        r = bank_effect(parts, run.bank, run.data, progress=run.progress)
    for w in said:
        warnings.warn(f"model {model!r}: {w.message}", w.category, stacklevel=2)
    setting = f"eps={run.bank.meta['eps']:g}"  # a number in (0, 2): checked at load
    run.report.add(model, run.seed, "noisebank", setting, "match_rate", 100 * r["match_rate"])
    run.report.add(model, run.seed, "noisebank", setting, "mse_prob", r["mse_prob"])


def _imagenet_c(run: Run, model: str, parts, kw: dict) -> None:
    err, absent = {}, []
    root = Path(run.folders["imagenet-c"])
    for c in CORRUPTIONS:
        for s in SEVERITIES:
            d = root / c / str(s)
            if not d.is_dir():
                absent.append(f"{c}/{s}")
            else:
                acc = folder_accuracy(parts, d, f"imagenet-c/{c}/{s}", run.model_classes, max_images=run.max_images,
                                      on_bad_image=run.on_bad_image, precropped="imagenet-c" in PRECROPPED,
                                      progress=run.progress)
                run.report.add(model, run.seed, "corruptions", f"{c}@{s}", "acc", 100 * acc)
                err.setdefault(c, []).append(1 - acc)
    if not err:
        raise NsvitError(f"imagenet-c: no <corruption>/<severity> folders under {root}")
    if absent:  # AlexNet's numbers are over all 15 x 5: a partial tree's mCE would be another quantity
        import warnings

        total = len(CORRUPTIONS) * len(SEVERITIES)
        warnings.warn(f"imagenet-c: {len(absent)} of {total} <corruption>/<severity> folders absent under {root} "
                      f"(e.g. {absent[0]}): accuracies only, no mCE", stacklevel=2)
        # the per-folder records make no column: their mean is the table's, labelled partial
        accs = [1 - e for errs in err.values() for e in errs]
        run.report.add(model, run.seed, "corruption_acc", f"{PARTIAL_C}{len(accs)}/{total}", "acc",
                       100 * sum(accs) / len(accs))
        return
    run.corr_err[model] = err
    run.report.add(model, run.seed, "corruptions", "ref=alexnet", "mce", mce_imagenet(err))


def _folder_suite(suite: str) -> Suite:
    """An OOD folder suite: top-1 accuracy on ``folders[suite]``, logits masked to its classes."""

    def go(run: Run, model: str, parts, kw: dict) -> None:
        acc = folder_accuracy(parts, run.folders[suite], suite, run.model_classes, max_images=run.max_images,
                              on_bad_image=run.on_bad_image, precropped=suite in PRECROPPED, progress=run.progress)
        run.report.add(model, run.seed, suite, "", "acc", 100 * acc)

    return Suite(go, needs="folder", help=f"{suite} folder (ImageFolder tree): top-1 accuracy")


SUITES: dict[str, Suite] = {
    "clean": Suite(_clean, help="top-1 accuracy"),
    **{name: _attack_suite(name, spec) for name, spec in ATTACKS.items()},  # patchfool and patchfool_lite too
    "corruptions": Suite(_corruptions, help="15 corruptions x 5 severities on the fly: accuracy, mean corruption "
                                            "accuracy, mCE (AlexNet reference on 1000 classes, else the baseline)"),
    "nullspace": Suite(_nullspace, {"scale": 10}, help="exact patch-embedding nullspace noise at scale x the "
                                                        "image norm: match rate, MSE-prob"),
    "noisebank": Suite(_noisebank, needs="bank", help="a NoiseBank's noises: match rate, MSE-prob"),
    **{name: _folder_suite(name) for name in OOD_SUITES},
    "imagenet-c": Suite(_imagenet_c, needs="folder", help="pre-generated ImageNet-C folder "
                                                          "(<corruption>/<severity>/<class>): accuracy, mCE"),
}

def register_attack(name: str, spec: AttackSpec, ranges: dict[str, tuple] | None = None, *,
                    replace: bool = False) -> None:
    """Add an attack from outside the package: it joins :data:`~nsvit_fast.eval.attacks.ATTACKS`
    and becomes the suite ``name`` (``evaluate(model, data, ["name:eps=2/255"])``, ``attack_accuracy``).

    Args:
        name: letters, digits, ``_`` and ``-``, starting with a letter (the suite syntax splits on
            ``:``, ``,`` and ``=``); a name already taken is refused unless ``replace`` and it is an attack.
        spec: the :class:`AttackSpec`, with a ``help`` line, and ``norm`` ("Linf" or "L2") if its
            defaults have ``eps``.
        ranges: a range for each numeric setting :data:`SETTING_RANGES` lacks, in its format
            (``("count", lo)`` or ``("number", lo, open, hi)``); a setting already there keeps its own.

    Raises:
        NsvitError: a bad or taken name, a spec without help, an eps without a norm, a numeric
        setting without a range, a malformed range or one that differs from the existing one.

    Example::

        from nsvit_fast.eval import AttackSpec, from_torchattacks, register_attack
        register_attack("mifgsm", AttackSpec(from_torchattacks("MIFGSM"), {"eps": 4 / 255, "steps": 10,
                        "decay": 1.0}, norm="Linf", help="MI-FGSM, L-inf; torchattacks"),
                        ranges={"decay": ("number", 0, False, 1e3)})
    """
    import math
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise NsvitError(f"attack name {name!r} must be letters, digits, _ and -, starting with a letter")
    if name in SUITES and not (replace and name in ATTACKS):
        raise NsvitError(f"suite {name!r} exists already" + (" (replace=True replaces an attack)"
                                                              if name in ATTACKS else " and is not an attack"))
    if not isinstance(spec, AttackSpec) or not callable(spec.factory) or not isinstance(spec.defaults, dict):
        raise NsvitError(f"attack {name!r}: spec must be an AttackSpec with a callable factory and a dict of "
                         f"defaults, got {type(spec).__name__}")
    if not isinstance(spec.help, str) or not spec.help.strip():
        raise NsvitError(f"attack {name!r}: give the spec a help line (eval --help and the suite list show it)")
    if "eps" in spec.defaults and spec.norm not in ("Linf", "L2"):
        raise NsvitError(f"attack {name!r}: eps needs norm='Linf' or 'L2' (an L-inf eps above 1 is refused), "
                         f"got {spec.norm!r}")
    ranges = dict(ranges or {})
    flags = [k for k, v in spec.defaults.items() if isinstance(v, bool)]
    if flags:  # a setting takes a number or a word: a switch is the constructor's, as PGD's random_start
        raise NsvitError(f"attack {name!r}: {flags[0]}={spec.defaults[flags[0]]} is a switch, not a setting: give it "
                         f"in fixed= (AttackSpec(..., fixed={{{flags[0]!r}: ...}}))")
    for k, r in ranges.items():
        if k not in spec.defaults:  # it would stay in the global table, ranging nothing of this attack
            raise NsvitError(f"attack {name!r}: ranges= names {k!r}, which is not one of its settings "
                             f"({', '.join(spec.defaults)})")
        ok = isinstance(r, tuple) and (
            (len(r) == 2 and r[0] == "count" and type(r[1]) is int)
            or (len(r) == 4 and r[0] == "number" and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                         and not isinstance(x, bool) for x in (r[1], r[3]))
                and isinstance(r[2], bool)
                and r[1] <= r[3]))
        if not ok:
            raise NsvitError(f"attack {name!r}: range of {k!r} must be ('count', lo) or ('number', lo, open, hi) "
                             f"with finite lo <= hi, got {r!r}")
        if k in SETTING_RANGES and SETTING_RANGES[k] != r:
            raise NsvitError(f"attack {name!r}: {k!r} has the range {SETTING_RANGES[k]!r} already, not {r!r}")
    numeric = [k for k, v in spec.defaults.items() if not isinstance(v, str)]
    missing = [k for k in numeric if k not in SETTING_RANGES and k not in ranges]
    if missing:
        raise NsvitError(f"attack {name!r}: give ranges= for the numeric setting(s) {', '.join(missing)} "
                         f"(a setting without one ran at any value, 1e300 included)")
    added = [k for k in ranges if k not in SETTING_RANGES]
    SETTING_RANGES.update(ranges)
    try:  # the defaults themselves in range
        check_settings(f"attack {name!r}", spec.defaults, spec.defaults)
        check_linf_eps(f"attack {name!r}", spec.defaults, spec.norm)
    except NsvitError:
        for k in added:
            del SETTING_RANGES[k]
        raise
    ATTACKS[name] = spec
    SUITES[name] = _attack_suite(name, spec)


# what `nsvit-fast eval` runs when no --suite is given: every suite that needs no folder or bank,
# PGD-L2 left out (the paper reports L-inf attacks)
DEFAULT_SUITES = ("clean", "fgsm", "pgd", "cw", "autoattack", "patchfool", "corruptions", "nullspace")
MCE_REFERENCES = ("auto", "alexnet", "baseline")  # what normalises mCE (evaluate's mce_reference)


def suite_help() -> str:
    """Returns one line per suite of SUITES, joined into one string (it prints nothing): name, what it
    measures, its settings with their defaults, and what it needs; for ``--help`` texts and the
    README."""
    lines = []
    for name, suite in SUITES.items():
        extra = [fmt_setting(suite.defaults)] if suite.defaults else []
        extra += [f"needs a {suite.needs}"] if suite.needs else []
        lines.append(f"{name:<16} {suite.help}" + (f" [{'; '.join(extra)}]" if extra else ""))
    return "\n".join(lines)


def _num(v: str):
    v = v.strip()
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(Fraction(v))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise NsvitError(f"setting value {v!r} is not a finite number (use 4/255 or 0.0157)") from None


def _check_setting(suite: str, k: str, v):
    from ..errors import MAX_COUNT

    rule = SETTING_RANGES.get(k)
    if isinstance(v, str):
        return v
    shown = f"{v:g}" if isinstance(v, float) or abs(v) < 1e15 else f"{str(v)[:6]}... ({len(str(v))} digits)"
    if rule and rule[0] == "count":
        if (isinstance(v, float) and not v.is_integer()) or v < rule[1]:
            raise NsvitError(f"{suite}: {k} must be a whole number >= {rule[1]}, got {shown}")
        if v > MAX_COUNT:  # int32: no tensor or loop index overflows (as the API's check_count)
            raise NsvitError(f"{suite}: {k} must be <= {MAX_COUNT}, got {shown}")
        return int(v)
    if rule and (v < rule[1] or (rule[2] and v == rule[1])):
        raise NsvitError(f"{suite}: {k} must be {'>' if rule[2] else '>='} {rule[1]}, got {shown}")
    if rule and v > rule[3]:  # float32 arithmetic stays finite below it (attacks.SETTING_RANGES)
        raise NsvitError(f"{suite}: {k} must be <= {rule[3]:g}, got {shown}")
    return v


def parse_suite(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fgsm:eps=4/255"`` -> ("fgsm", {"eps": 0.0157}): the suite's name and its settings, the
    registry's defaults updated by the ones given. Values are numbers (ints, floats or fractions),
    or words where the default is a word (patchfool:attack_mode=ce).
    Raises NsvitError for an unknown suite (naming the nearest), an unknown key, a value that is
    not a number (where the default is one), or a value outside its range (``SETTING_RANGES``: a
    negative eps, and past each upper bound, e.g. cw:c=1e39, where float32 stops being finite)."""
    name, _, rest = spec.strip().partition(":")
    if name not in SUITES:
        import difflib

        near = difflib.get_close_matches(name, SUITES, n=1)
        raise NsvitError(f"unknown suite {name!r}" + (f" (did you mean {near[0]!r}?)" if near else
                                                    f" (suites: {', '.join(SUITES)})"))
    kw: dict[str, Any] = {}
    defaults = SUITES[name].defaults
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
    full = {**defaults, **{k: _check_setting(name, k, v) for k, v in kw.items()}}
    check_linf_eps(name, full, SUITES[name].norm)
    return name, full


def fmt_setting(kw: dict[str, Any]) -> str:
    """Settings as a report writes them: {"eps": 4/255, "steps": 10} -> "eps=4/255,steps=10"."""
    def f(v):
        if isinstance(v, float) and 0 < v < 1 and abs(v * 255 - round(v * 255)) < 1e-6:
            return f"{round(v * 255)}/255"
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={f(v)}" for k, v in kw.items())


def share_class_names(models: dict) -> dict:
    """Models compared in one evaluation are scored on the first model's labels. Where some record
    their class names and others (a timm train.py file, a plain torch checkpoint) do not, the
    unnamed ones take the named ones' names, with a warning naming them: an unnamed first model
    read a folder by sorted position while a finetuned --compare model recorded its classes, and a
    folder missing one class scored both 0%. Called before any folder is read. Returns {name: the
    class_names it had} for the models it named, so a caller can put them back."""
    import warnings

    from ..data.folders import known_class_names

    known = {name: known_class_names(m) for name, m in models.items()}
    named = [name for name, k in known.items() if k is not None]
    if not named or len(named) == len(models):
        return {}
    ref, given = known[named[0]], {}
    for name, m in models.items():
        if known[name] is None and hasattr(m, "class_names") and m.num_classes == len(ref):
            given[name] = m.class_names
            m.class_names = list(ref)
            warnings.warn(f"model {name!r} records no class names: its outputs are read as {named[0]!r}'s "
                          f"({', '.join(ref[:4])}{', ...' if len(ref) > 4 else ''}), in that order", stacklevel=3)
    return given


def check_comparable(models: dict, streamed: bool) -> None:
    """Refuse models that one evaluation cannot score fairly: every model is scored on one set of
    images and labels, made for the first model (its class mapping; for a folder, its eval
    transform). So the others must have its class count and, where both are known, its class names,
    its input size and, for a ``streamed`` folder, its resize and crop. Mean and std may differ:
    each adapter normalises the pixels itself."""
    from ..data.folders import known_class_names

    names = list(models)
    first = models[names[0]]
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode") if streamed else ("input_size",)
    for name in names[1:]:
        m = models[name]
        if m.num_classes != first.num_classes:
            raise NsvitError(f"models {names[0]!r} and {name!r} have {first.num_classes} and {m.num_classes} "
                             f"classes: every model is scored on {names[0]!r}'s labels, so compare models with "
                             f"the same classes (evaluate the others separately)")
        # known names compared whatever the labels come from (--classes or the folder): the same class
        # at another output is scored as wrong
        a, b = known_class_names(first), known_class_names(m)
        if a is not None and b is not None and a != b:
            diff = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            raise NsvitError(f"models {names[0]!r} and {name!r} name output {diff} {a[diff]!r} and {b[diff]!r}: "
                             f"every model is scored on {names[0]!r}'s labels (evaluate them separately)")
        for k in keys:
            if m.data_config[k] != first.data_config[k]:
                raise NsvitError(f"models {names[0]!r} and {name!r} take {k} {first.data_config[k]} and "
                                 f"{m.data_config[k]}: the images are prepared once, for {names[0]!r} (evaluate "
                                 f"them separately)")


def check_imagenet_c(root: str | Path, names: list[str]) -> None:
    """Every <corruption>/<severity> folder under ``root`` checked as :func:`folder_accuracy` checks
    it (class folders complete for the model's ``names``, none empty), before any model runs. Absent
    ones are let through: the suite scores the others, warns, and gives no mCE."""
    root = Path(root)
    found = [(c, s) for c in CORRUPTIONS for s in SEVERITIES if (root / c / str(s)).is_dir()]
    if not found:
        raise NsvitError(f"imagenet-c: no <corruption>/<severity> folders under {root}")
    for c, s in found:
        check_folder(root / c / str(s), f"imagenet-c/{c}/{s}", names)


def _refuse_twice(suites, specs: list[tuple[str, dict]]) -> None:
    """Refuse two suites that would make the same records (``suites`` as given, ``specs`` parsed)."""
    # as the records name them: "fgsm" is "fgsm:eps=1/255", scale=10 is scale=10.0000001 (6 digits)
    full = [(name, fmt_setting({**SUITES[name].defaults, **kw})) for name, kw in specs]
    for i, spec in enumerate(full):
        if spec in full[:i]:
            raise NsvitError(f"suite {suites[i]} is given twice (as {suites[full.index(spec)]})")


def _fit_n(suite: str, kw: dict[str, Any], total: int, asked: bool = True) -> dict[str, Any]:
    """``kw`` with its ``n`` (images to attack) cut to the ``total`` images there are, and a warning
    when the caller ``asked`` for that n (the default's cut on a small set is no news): the record
    is named by the n attacked, not "n=1000" for a 4-image set."""
    n = kw.get("n")
    if n is None or n <= total:
        return kw
    import warnings

    if asked:
            warnings.warn(f"{suite}: n={n} but the data holds {total} image(s): all {total} are attacked, "
                      f"recorded as n={total}", stacklevel=3)
    return {**kw, "n": total}


def evaluate(models, data, suites=("clean", "fgsm"), seed: int = 0, *, baseline: str | None = None,
             folders: dict[str, str] | None = None, bank=None, model_classes: list[str] | None = None,
             mce_reference: str = "auto", max_images: int | None = None, progress: bool = True,
             log=None, on_bad_image: str = "error") -> Report:
    """Evaluate one model (adapter or timm ViT) or several ({name: model}) on ``data`` and the named
    suites; returns a Report.

    Args:
        data: an ImageDataset (pixels in [0, 1], in memory), an EvalImages, or the path of an
            ImageFolder tree (ImageNet val, ...), streamed batch by batch through the first model's
            eval transform and never read whole; every suite gives the same numbers either way.
        baseline: the model (a key of ``models``) whose corruption errors normalise mCE on non-ImageNet
            data; default the first model (pass the un-finetuned model first).
        folders: paths of the folder suites, e.g. {"imagenet-r": "/data/imagenet-r"}.
        bank: a NoiseBank for the ``noisebank`` suite.
        mce_reference: "alexnet", "baseline" or "auto" (AlexNet for 1000-class models).
        model_classes: the models' class names, for folder suites on models without 1000 classes.
        max_images: evaluate on ``max_images`` images, picked as ``load_data`` picks them (a
            folder's spread over its classes, an in-memory set's first ones, or spread where its
            labels are sorted), and at most that many per folder suite.
        progress, log: print (or pass to ``log``) one timing line per model and suite; ``progress``
            also shows a per-batch bar inside each suite, on a terminal only.
        on_bad_image: an unreadable file in a data folder or a folder suite: ``error`` (stop,
            naming it) or ``skip`` (left out, one warning with the count; the report's context
            counts the images scored and the ``skipped`` ones).

    Returns a Report with one record per (model, suite, setting, metric), at ``seed``. An attack's
    ``n`` above the number of images is cut to it, with a warning: the record names the n attacked.
    A partial ImageNet-C tree gives its mean accuracy (``corruption_acc`` at ``partial=K/75``), no
    mCE. The model is put in eval mode for each suite and given back in its own mode. Raises
    NsvitError for an unknown suite or setting, a baseline that is not a model, models that cannot
    share one set of labels and images (:func:`check_comparable`), or a missing or incomplete folder
    or a missing NoiseBank, all before any model runs.
    """
    from ..errors import check_count, check_seed

    if not isinstance(models, dict):
        models = {getattr(models, "name", "model"): models}
    if not models:
        raise NsvitError("evaluate needs at least one model")
    models = {k: adapt(m) for k, m in models.items()}
    seen: dict[int, str] = {}
    for k, m in models.items():  # finetune trains its model in place: {"start": parts, "ns": res.parts} is one model
        if id(m.model) in seen:
            raise NsvitError(f"models {seen[id(m.model)]!r} and {k!r} are one model object (finetune trains the "
                             f"model it is given in place): load the other one again to compare them")
        seen[id(m.model)] = k
    if isinstance(suites, str):  # one suite spec, not its letters
        suites = [suites]
    if not suites or not all(isinstance(s, str) for s in suites):
        raise NsvitError(f"suites must be a non-empty list of suite specs (\"fgsm:eps=4/255\"), got {suites!r}")
    seed = check_seed("seed", seed)
    if max_images is not None:
        max_images = check_count("max_images", max_images)
    if mce_reference not in MCE_REFERENCES:
        raise NsvitError(f"mce_reference must be one of {', '.join(MCE_REFERENCES)}, got {mce_reference!r}")
    if folders is not None and not isinstance(folders, dict):
        raise NsvitError(f"folders must be a mapping {{suite: path}}, got {type(folders).__name__}")
    if bank is not None and not hasattr(bank, "check_model"):
        raise NsvitError(f"bank must be a NoiseBank (NoiseBank.load(path, parts)), got {type(bank).__name__}")
    specs = [parse_suite(s) for s in suites]
    _refuse_twice(suites, specs)
    listed = {s for s, _ in specs}  # what no listed suite reads would be ignored without a word
    if bank is not None and "noisebank" not in listed:
        raise NsvitError("bank= is read by the noisebank suite only; add noisebank to suites")
    for suite in folders or {}:
        if suite in SUITES and SUITES[suite].needs != "folder":
            raise NsvitError(f"folders[{suite!r}]: suite {suite!r} reads no folder")
        if suite not in listed:
            import difflib

            near = difflib.get_close_matches(str(suite), [n for n, s in SUITES.items() if s.needs == "folder"], n=1)
            raise NsvitError(f"folders[{suite!r}]: no suite {suite!r} in suites reads it"
                             + (f" (did you mean {near[0]!r}?)" if near and near[0] != suite else "; add it to suites"))
    if {"corruptions", "imagenet-c"} <= {s for s, _ in specs}:  # one C column, one set of records
        raise NsvitError("suites corruptions and imagenet-c both fill the corruption column (C): give one of "
                         "them per evaluation")
    from ..data import BAD_IMAGE

    if on_bad_image not in BAD_IMAGE:
        raise NsvitError(f"on_bad_image must be one of {', '.join(BAD_IMAGE)}, got {on_bad_image!r}")
    names = list(models)
    lent = share_class_names(models)  # before the first model's rules read a folder
    try:
        kw = {"on_bad_image": on_bad_image} if isinstance(data, (str, Path)) else {}
        source = as_eval_images(data, models[names[0]], max_images, **kw)
        for name, m in models.items():
            check_labels_fit(m.num_classes, source, f"the data (for {name})")
        check_comparable(models, isinstance(data, (str, Path, FolderImages)))
        if bank is not None and any(s == "noisebank" for s, _ in specs):  # before any suite runs, not at its turn
            for m in models.values():
                bank.check_fits(m)
        for i, (name, kw) in enumerate(specs):  # a loop, not a comprehension: the warning names our caller
            given = str(suites[i]).partition(":")[2]
            specs[i] = (name, _fit_n(name, kw, len(source), "n" in {p.split("=")[0].strip() for p in given.split(",")}))
        _refuse_twice(suites, specs)  # autoattack:n=100 and n=200 on 50 images are one run
        baseline = baseline or names[0]
        if baseline not in models:
            raise NsvitError(f"baseline {baseline!r} is not one of the evaluated models {names}")
        from ..models import weights_fingerprint

        what = str(getattr(source, "root", None) or getattr(data, "name", None) or type(data).__name__)
        context = {"data": what, "images": len(source),
                   "models": {n: {"arch": m.arch, "weights": weights_fingerprint(m)} for n, m in models.items()}}
        run = Run(Report(context=context), source, seed, baseline, dict(folders or {}), bank, model_classes,
                  mce_reference, max_images, on_bad_image, progress=progress)
        checked = set()
        for suite, _ in specs:
            needs = SUITES[suite].needs
            if needs == "folder" and suite not in run.folders:
                raise NsvitError(f"suite {suite} needs its folder: folders={{'{suite}': PATH}} (--folder {suite}=PATH)")
            if needs == "folder":  # the folder and the class names each model's outputs map to, before any model runs
                for parts in models.values():
                    known = model_class_names(parts, model_classes)
                    if (suite, tuple(known)) in checked:  # ImageNet-C's 75 folders once, not once per model
                        continue
                    checked.add((suite, tuple(known)))
                    if suite == "imagenet-c":
                        check_imagenet_c(run.folders[suite], known)
                    else:
                        check_folder(run.folders[suite], suite, known)
            if needs == "bank" and bank is None:
                raise NsvitError(f"suite {suite} needs a NoiseBank (bank=..., --bank FILE)")
        say = log or (print if progress else (lambda *_: None))
        # the baseline first: its corruption errors normalise everyone's mCE
        for name in sorted(names, key=lambda n: n != baseline):
            parts = models[name]
            for suite, kw in specs:
                t0 = time.perf_counter()
                with eval_mode(parts):  # every suite, the nullspace metrics too
                    SUITES[suite].run(run, name, parts, kw)
                setting = fmt_setting(kw)
                say(f"  {name} {suite}{':' + setting if setting else ''}: {time.perf_counter() - t0:.1f} s")
        skipped = len(getattr(source, "skipped", ()))
        if skipped:  # known once a pass has read them: the count scored, not the files listed
            run.report.context.update(images=len(source) - skipped, skipped=skipped)
        return run.report
    finally:  # the caller's adapters keep the names they had
        for name, had in lent.items():
            models[name].class_names = had

"""The main job on the embedded default: the whole pipeline on the digits ViT.

1. Exact nullspace: the committed model's nullspace table; exact nullspace noise of norm ``scale``
   x each image's norm leaves predictions unchanged (the paper's Fig. 2).
2. Finetuning: Algorithm 1 (ns) and the plain and random baselines on the same budget
   (configs/digits.yaml; random matches the ns run's per-round noise norms).
3. Evaluation: clean accuracy and attacks in pixel space, a Table-2-style comparison, plots.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .data import digits
from .errors import MAX_NOISE_SCALE, NsvitError, check_positive
from .io import write_json, write_text
from .models import load_model
from .nullspace import nullspace_basis, verify_invariance
from .pretrain import accuracy
from .viz import nullspace_noise_figure


def run_demo(out_dir: str | Path = "runs/demo", scale: float = 10.0, num_images: int = 397,
             seed: int = 0, quick: bool = False, log=print) -> dict:
    """``quick``: 2 rounds of 5 steps (for tests), instead of the digits config's budget."""
    t0 = time.perf_counter()
    from .io import check_output_dir

    check_positive("scale", scale)
    if scale > MAX_NOISE_SCALE:  # float32 noise overflows: NaN, not a test of invariance
        raise NsvitError(f"scale must be at most {MAX_NOISE_SCALE:g} (noise norm / image norm), got {scale:g}")

    from .runlock import DEMO_FILES, check_not_a_run, run_lock

    out = check_output_dir(out_dir, "out", DEMO_FILES)
    check_not_a_run(out)  # a finetune run's folder: the demo's Fig. 4 would replace the run's
    if (out / "report.json").is_file():  # an evaluation's folder: its report.md would become the demo's
        raise NsvitError(f"out: {out} holds an evaluation report (report.json); give the demo its own folder")
    for sub in ("eval", "finetune"):  # folders it writes into: a file there would fail after the run
        if (out / sub).exists() and not (out / sub).is_dir():
            raise NsvitError(f"out: {out / sub} is a file, where the demo writes a folder")
    from .eval.report import Report

    Report.check_folder(out / "eval")  # a user's report there was refused only after the whole demo ran
    for method in ("ns", "plain", "random"):  # as the finetunes would, after the nullspace stage's figure
        if (out / "finetune" / method / "report.json").exists():
            raise NsvitError(f"out: {out / 'finetune' / method} holds an evaluation report (report.json); "
                             f"give the demo its own folder")

    with run_lock(out):  # a second demo on this folder rewrote Fig. 2 before a finetune's lock stopped it
        _check_resumable(out, demo_config(seed, quick))  # before the first stage writes its figure
        result = nullspace_stage(out, scale, num_images, seed, log)
        result["finetune"] = finetune_stage(out, seed, quick, log)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(out / "demo.json", result)
        write_text(out / "report.md", _report(result))
    log(f"wrote {out / 'report.md'} ({result['seconds']} s)")
    return result


def nullspace_stage(out: Path, scale: float, num_images: int, seed: int, log) -> dict:
    """The demo's first stage on the embedded digits model: test accuracy on ``num_images`` test
    images, the exact nullspace (Table 1 row), invariance to seeded nullspace noise of ``scale``
    times each image's norm in float32 and float64, and the Fig. 2 panel written to ``out``.
    ``log`` takes one line at a time. Returns the stage's record (JSON-ready)."""
    t0 = time.perf_counter()
    parts = load_model("digits_vit")
    test = digits("test").subset(num_images)
    acc = accuracy(parts, test.images, test.labels)
    basis = nullspace_basis(parts)
    row = basis.summary("digits_vit")
    log(f"model digits_vit: test accuracy {acc:.4f} on {len(test)} digits test images")
    log(format_nullspace_rows([row]))

    g = torch.Generator().manual_seed(seed)
    unit = basis.sample(len(test), norm=1.0, generator=g, dtype=torch.float64)
    noise64 = unit * (scale * test.images.double().flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    noise = noise64.float()
    moved = ((test.images + noise) != test.images).flatten(1).float().mean(1)
    if not bool((moved > 0.5).all()):  # below float32's resolution: "predictions unchanged" would test nothing
        raise NsvitError(f"scale {scale:g} is too small for float32: adding the noise leaves most pixels of some "
                         f"images as they were (x + noise == x), so nothing would be tested; use a larger scale")
    inv32 = verify_invariance(parts, test.images, noise)
    parts64 = load_model("digits_vit").double()
    inv64 = verify_invariance(parts64, test.images.double(), noise64)
    log(f"noise norm {scale:g}x each image's norm (min ratio {inv32['noise_to_image_norm']:.1f}):")
    for tag, inv in (("float32", inv32), ("float64", inv64)):
        log(f"  {tag}: predictions unchanged {inv['predictions_match']:.2%}, max relative change "
            f"patch embedding {inv['patch_embed_rel']:.2e}, logits {inv['logits_rel']:.2e}")

    with torch.no_grad():
        k = 4
        pc = parts(test.images[:k]).softmax(-1)
        pn = parts(test.images[:k] + noise[:k]).softmax(-1)
    fig = nullspace_noise_figure(test.images[:k], noise[:k], pc, pn, out / "fig2_nullspace_noise.png")
    log(f"wrote {fig} ({time.perf_counter() - t0:.1f} s)")
    return {"model": "digits_vit", "test_accuracy": acc, "nullspace": row, "noise_scale": scale,
            "invariance_float32": inv32, "invariance_float64": inv64, "figure": str(fig)}


SUITES = ["clean", "fgsm", "fgsm:eps=4/255", "fgsm:eps=8/255", "pgd", "cw", "patchfool", "corruptions"]
QUICK_SUITES = ["clean", "fgsm", "fgsm:eps=8/255", "pgd"]


def demo_config(seed: int, quick: bool):
    """The FinetuneConfig every demo finetune runs: configs/digits.yaml at ``seed`` (``quick``: 2
    rounds of 5 steps, 300 synthesis steps)."""
    from .train.yamlcfg import load_run

    _, cfg = load_run("digits", {"seed": seed})
    if quick:
        cfg = dataclasses.replace(cfg, rounds=2, model_steps=5,
                                  synth=dataclasses.replace(cfg.synth, lim=3.0, lim_unit="abs", max_steps=300))
    return cfg


def _check_resumable(out: Path, cfg) -> None:
    """The demo resumes its finetunes from ``out/finetune/<method>``; one left by a demo with other
    settings (another --seed, --quick or not) is refused here, before anything in ``out`` is rewritten.
    Only the header is compared; the engine checks the whole checkpoint when it resumes."""
    from .io import load_tensors
    from .train.engine import STATE_FILE

    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for method in ("ns", "plain", "random"):
        path = out / "finetune" / method / STATE_FILE
        if not path.is_file():
            continue
        theirs = load_tensors(path)[1].get("config")
        diff = [k for k in ("seed", "rounds", "model_steps") if not isinstance(theirs, dict)
                or json.loads(json.dumps(theirs.get(k))) != mine[k]]
        if diff:
            raise NsvitError(f"{path} belongs to another demo ({diff[0]} differs: another --seed or --quick?); "
                             f"use another --out")


def finetune_stage(out: Path, seed: int, quick: bool, log) -> dict:
    """The demo's second stage: finetune the digits model with ns, plain and random (the
    norm-matched control, ``random.match: norm``, at ns's per-round noise norms) from ``configs/digits.yaml`` (``quick``: 2 rounds of 5
    steps, 300 synthesis steps), resuming from ``out/finetune/<method>``; the Fig. 4-style trend; the
    evaluation suites against the pretrained model, saved under ``out/eval``. Returns the config,
    Table 2, the report, histories and seconds per method."""
    import warnings

    from .train import finetune
    from .train.plots import trend_figure

    cfg = demo_config(seed, quick)
    from .eval import evaluate

    train, val, test = digits("train"), digits("val"), digits("test")
    models = {"pretrained": load_model("digits_vit")}
    histories, ns_norms, seconds = {}, None, {}
    for method in ("ns", "plain", "random"):
        t0 = time.perf_counter()
        log(f"finetune {method}: {cfg.rounds} rounds x {cfg.model_steps} steps")
        parts = load_model("digits_vit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = finetune(parts, train, cfg, method=method, val_data=val, out_dir=out / "finetune" / method,
                           resume=True, **({"random.match": "norm", "random.norms": ns_norms}
                                           if method == "random" else {}))
        histories[method] = res.history
        if method == "ns":
            ns_norms = [h["noise_norm"] for h in res.history]
        models[method] = parts
        seconds[method] = round(time.perf_counter() - t0, 1)
    trend_figure(histories["ns"], out / "fig4_trend.png", title="digits_vit, ns: trend across rounds")
    log("evaluate: " + ", ".join(QUICK_SUITES if quick else SUITES))
    report = evaluate(models, test, QUICK_SUITES if quick else SUITES, seed=seed, baseline="pretrained", log=log)
    report.save(out / "eval")
    return {"config": dataclasses.asdict(cfg), "table2": report.table2(), "report": report.to_dict(),
            "histories": histories, "seconds": seconds}


def format_nullspace_rows(rows: list[dict]) -> str:
    """The rows of ``nullspace_table`` as a fixed-width text table (model, patch, dims, rank, nullspace)."""
    head = f"{'model':28s} {'patch':>5s} {'input dim':>9s} {'embed dim':>9s} {'rank':>5s} {'nullspace':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:28s} {str(r['patch_size']):>5s} {r['input_dim']:>9d} {r['embed_dim']:>9d} "
                     f"{r['rank']:>5d} {r['nullspace_dim']:>9d}")
    return "\n".join(lines)


def _report(r: dict) -> str:
    n = r["nullspace"]
    i32, i64 = r["invariance_float32"], r["invariance_float64"]
    ft = r["finetune"]
    c = ft["config"]
    ns_h = ft["histories"]["ns"]
    from .train.plots import mse_label
    rounds = "\n".join(f"| {h['round']} | {h['noise_norm']:.1f} | {h['mse_prob']:.4f} | {h['synth_steps']} | "
                        f"{h['val_acc']:.3f} |" for h in ns_h)
    if ns_h and ns_h[0].get("val_acc_start") is not None:  # the starting model's row, as Fig. 4 starts there
        rounds = f"| start | - | - | - | {ns_h[0]['val_acc_start']:.3f} |\n" + rounds
    corr = any(x["suite"] == "corruptions" for x in ft["report"]["records"])  # not in --quick
    heading = "attacks in pixel space" + (", corruptions on the fly" if corr else "")
    c_note = ("C↓ is mCE relative to the pretrained model (so it scores 100); C acc is the mean accuracy over the\n"
              "15 corruptions × 5 severities. " if corr else "")
    c_fig = "\n![corruptions](eval/corruptions.png)\n" if corr else ""
    # the paper's C is AlexNet-normalised mCE; here it is relative to the pretrained model, so the
    # Average compares these rows only
    avg_c = (", with C as 100 - mCE relative to the pretrained model (the paper normalises by AlexNet), so it "
             "compares these rows, not the paper's" if corr else "")
    return f"""# nsvit-fast demo report

Model `digits_vit` (embedded, committed checkpoint): test accuracy **{r['test_accuracy']:.4f}**.
Whole demo: {r['seconds']} s on this machine.

## 1. Exact patch-embedding nullspace

| patch | input dim C·r² | embed dim D | rank | nullspace dim |
|---|---|---|---|---|
| {n['patch_size']} | {n['input_dim']} | {n['embed_dim']} | {n['rank']} | {n['nullspace_dim']} |

Invariance to nullspace noise ({r['noise_scale']:g}× each image's norm):

| precision | predictions unchanged | max rel. change, patch embedding | max rel. change, logits |
|---|---|---|---|
| float32 | {i32['predictions_match']:.2%} | {i32['patch_embed_rel']:.2e} | {i32['logits_rel']:.2e} |
| float64 | {i64['predictions_match']:.2%} | {i64['patch_embed_rel']:.2e} | {i64['logits_rel']:.2e} |

![nullspace noise](fig2_nullspace_noise.png)

## 2. Finetuning (Algorithm 1 and baselines, same budget)

{c['rounds']} rounds × {c['model_steps']} steps, lr {c['lr']}, batch {c['batch_size']}, eps {c['synth']['eps']},
lim {c['synth']['lim']} ({c['synth']['lim_unit']}), noise init {c['noise_init']}. `random` uses Gaussian noise with
the ns run's per-round norms (`random.match: norm`, a norm-matched control; the literal reading of the paper's
Table 4 control, an ε-matched Gaussian, is `random.match: eps`, the finetune default).

| round | ns noise norm | {mse_label(ns_h)} | synthesis steps | val acc |
|---|---|---|---|---|
{rounds}

![trend](fig4_trend.png)

## 3. Robustness (397 test digits, {heading})

{ft['table2']}
{c_note}The Average takes the paper's Table-2 columns at their settings{avg_c}; PGD and any other
column outside Table 2 are shown beside it, not averaged. One seed: differences of 1-3 points are within the noise of a 397-image test set (one image is
0.25 points). `bench/compare_methods.py` repeats the comparison over seeds with error bars.

![suites](eval/suites.png)
{c_fig}"""


__all__ = ["run_demo", "nullspace_stage", "finetune_stage", "format_nullspace_rows", "SUITES", "QUICK_SUITES"]

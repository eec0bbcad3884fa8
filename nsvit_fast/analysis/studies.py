"""The paper's studies of the approximate nullspace, each writing a PNG and a JSON:

- ``fig3``: Sec. 3.3 / Fig. 3, the exploratory Eq. 4 swept over lambda: held-out match rate and
  MSE-prob of the learned noise and of its permuted copy, and the noise norm.
- ``fig5``: Sec. 5.6 / Fig. 5, from m noises learned at ε: MSE-prob of alpha v against alpha (with
  the alpha ε line), and the heatmap of MSE-prob of alpha1 v_i + alpha2 v_j over n pairs, with the ε
  contour. The noises stop on held-out data (``stop="heldout"``) so that each is within ε there.
- ``trend``: Sec. 5.4, a Fig. 4-style trend from a finetuning run's log (its per-round metrics,
  not the paper's robustness scores).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import torch

from ..errors import NsvitError, check_count, check_number
from ..io import check_output_dir
from ..io import save_figure, staged_writes, write_json
from ..synth import CleanCache, noise_effect, synthesize, synthesize_regularized
from ..config import build
from ..data.stream import StreamingData
from ..synth.engine import MAX_LAM, SynthConfig, check_config, image_tensor, metric_images
from ..viz import pyplot


@staged_writes()  # the figure and its JSON: both new, or both as they were
def fig3(parts, data, out: str | Path, lams=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0), steps: int = 300, **synth) -> dict:
    """Fig. 3: Eq. 4 (keep the output, grow the noise norm, weighed by lambda) for each lambda.

    Args:
        parts: the model's adapter.
        data: an ImageDataset (or (N, C, H, W) pixels in [0, 1]); held-out images are carved out of it.
        out: folder receiving ``fig3_regularized.png`` and ``fig3_regularized.json``.
        lams: the lambda values, one noise each.
        steps: optimisation steps per noise.
        **synth: settings of :func:`nsvit_fast.synth.synthesize_regularized` (lim, seed, batch_size, ...;
            batch_size 64 unless given, as ``analyze fig3``); not the ones fig3 sets itself (max_steps:
            ``steps``; num_noises, lam: ``lams``; progress; mode). The λ noises are learned in one
            batched descent, so they share one batch order and differ in their starting draws.

    Returns:
        the JSON's contents: {"study": "fig3", "model", "model_weights" (its weights fingerprint),
        "steps", "synth" (the synthesis settings it ran with: lim, batch_size, lr, seed, ...), "rows":
        one {"lambda", "norm", "match_rate", "mse_prob", "permuted_match_rate", "permuted_mse_prob"}
        per lambda, "heldout_images", "figure": the PNG's path}.

    Raises:
        NsvitError: bad data or settings (as synthesis raises them; under 4 images leave none to
            hold out), a setting fig3 sets itself, or an unwritable ``out``.
    """
    _refuse_own_keys("fig3", synth, {"max_steps": "pass steps=N instead", "num_noises": "one noise per lambda, "
                                     "pass lams=[...] instead", "lam": "pass lams=[...] instead",
                                     "progress": "it runs without a progress bar; drop progress=",
                                     "mode": "it learns in mode fast; drop mode="})
    out = check_output_dir(out, "out", ("fig3_regularized.png", "fig3_regularized.json"))  # before the descent
    if isinstance(lams, (str, bytes)) or not hasattr(lams, "__iter__"):
        raise NsvitError(f"lams must be a list of numbers, got {lams!r}")
    lams = [check_number("lambda", v, lo=0, hi=MAX_LAM) for v in lams]
    if not lams:
        raise NsvitError("lams is empty: give at least one lambda")
    synth = {"batch_size": 64, **synth}  # the command's default (the API fell through to synthesis' 128)
    bank = synthesize_regularized(parts, data, lam=list(lams), steps=steps, progress=False, **synth)
    rows = [{"lambda": lam, "norm": float(bank.norm[i]), "match_rate": float(bank.match_rate[i]),
             "mse_prob": float(bank.mse_prob[i]), "permuted_match_rate": bank.meta["permuted_match_rate"][i],
             "permuted_mse_prob": bank.meta["permuted_mse_prob"][i]} for i, lam in enumerate(lams)]
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.9))
    x = list(range(len(lams)))
    a.plot(x, [100 * r["match_rate"] for r in rows], "o-", c="C0", label="match %, learned")
    a.plot(x, [100 * r["permuted_match_rate"] for r in rows], "o--", c="C0", label="match %, permuted")
    a2 = a.twinx()
    a2.plot(x, [r["mse_prob"] for r in rows], "s-", c="C3", label="MSE-prob, learned")
    a2.plot(x, [r["permuted_mse_prob"] for r in rows], "s--", c="C3", label="MSE-prob, permuted")
    a.set_xticks(x, [f"{v:g}" for v in lams])
    a.set_xlabel("λ")
    a.set_ylabel("prediction match (%)")
    a2.set_ylabel("MSE-prob")
    a.set_title("(a) noise influence on the output", fontsize=9)
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()   # one legend below the axes: the curves cross the whole panel
    a.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=7)
    b.plot(x, [r["norm"] for r in rows], "o-")
    b.set_xticks(x, [f"{v:g}" for v in lams])
    b.set_xlabel("λ")
    b.set_ylabel("‖v‖")
    b.set_title("(b) norm of the learned noise", fontsize=9)
    fig.tight_layout()
    png = save_figure(fig, out / "fig3_regularized.png", dpi=110)
    plt.close(fig)
    res = {"study": "fig3", **_provenance(parts, bank), "steps": steps, "rows": rows,
           "heldout_images": bank.meta["heldout_images"], "figure": str(png)}
    write_json(out / "fig3_regularized.json", res)
    return res


def _provenance(parts, bank) -> dict:
    """What made a study's numbers: the model, its weights fingerprint and the synthesis settings."""
    keys = ("eps", "lim", "lim_unit", "lr", "lr_schedule", "weight_decay", "max_steps", "batch_size", "mode",
            "schedule", "stop", "heldout", "seed", "precision")
    return {"model": parts.name, "model_weights": bank.meta.get("model_fingerprint"),
            "synth": {k: bank.meta[k] for k in keys if k in bank.meta}}


def _refuse_own_keys(study: str, synth: dict, own: dict) -> None:
    """A ``**synth`` key the study sets itself would be overridden or collide (a raw TypeError): name it."""
    for key, hint in own.items():
        if key in synth:
            raise NsvitError(f"{study} sets {key} itself: {hint}")


FIG5_EPS = 0.033  # the paper's Sec. 5.6 learns the Fig. 5 noises at eps 0.033 (finetuning uses 0.03)
# synthesize's keywords that are not SynthConfig fields
_SYNTH_KEYWORDS = ("config", "init", "heldout_data", "progress", "log", "device", "cache", "precision", "runtime")


def _fig5_heldout(parts, data, synth: dict, eps: float, m: int, seed: int) -> torch.Tensor:
    """The images :func:`synthesize` measures its metrics on under these settings (its own
    :func:`metric_images` with the same resolved config), refusing, before the descent, settings
    under which they would not be held out of the noises' training images."""
    if isinstance(data, StreamingData):
        raise NsvitError("fig5 needs images in memory (an ImageDataset or an image tensor), not a streamed folder")
    if synth.get("cache") is not None:  # synthesize then measures on the cache's (training) images
        raise NsvitError("fig5 measures on held-out images: cache= makes synthesis measure on its training images")
    over = {k: v for k, v in synth.items() if k not in _SYNTH_KEYWORDS}
    cfg = check_config(build(SynthConfig, synth.get("config"), {**over, "eps": eps, "num_noises": m, "seed": seed},
                             "synthesis"))
    run = dataclasses.replace(cfg, stop="heldout") if cfg.schedule == "boundary" else cfg  # as synthesize runs it
    given = synth.get("heldout_data")
    if given is None and run.stop != "heldout":
        raise NsvitError(f"fig5 measures on held-out images: stop={cfg.stop!r} trains on every image; "
                         f"use stop='heldout' (the default) or give heldout_data=")
    images = image_tensor(data, parts)
    return metric_images(images, run, None if given is None else image_tensor(given, parts, "heldout_data"))[1]


@staged_writes()  # the figure and its JSON: both new, or both as they were
def fig5(parts, data, out: str | Path, m: int | None = None, n_pairs: int = 10, eps: float = FIG5_EPS,
         seed: int = 0, **synth) -> dict:
    """Fig. 5: properties of the approximate nullspace from m noises learned at ``eps``.

    Args:
        parts: the model's adapter.
        data: an ImageDataset (or (N, C, H, W) pixels in [0, 1]), in memory; the noises stop on
            images held out of it (``stop="heldout"``; or on ``heldout_data``), and every MSE-prob
            is measured there.
        out: folder receiving ``fig5_properties.png`` and ``fig5_properties.json``.
        m: noises to learn (default 100 on CUDA, as the paper, 24 on the CPU); at least 2.
        n_pairs: distinct random pairs {i, j} of converged noises (drawn without replacement)
            averaged in the heatmap of alpha1 v_i + alpha2 v_j; at most m_converged (m_converged - 1) / 2.
        eps: the stop threshold (default the paper's Sec. 5.6 value, ``FIG5_EPS``).
        seed: noise initialisation, held-out split and pair draw.
        **synth: further settings of :func:`nsvit_fast.synth.synthesize` (lim, batch_size,
            heldout, heldout_data, ...); not num_noises (``m``) or progress, which fig5 sets. Every
            MSE-prob is measured on the images synthesis used for its held-out metrics. Our
            defaults, not the paper's: batch_size 64 (its B = 128), and the m noises are learned in
            one batched descent, so they share one batch order and differ in their starting draws.

    Returns:
        the JSON's contents: {"study": "fig5", "model", "model_weights", "synth" (as fig3's),
        "m_requested", "m_converged", "n_pairs", "eps", "device",
        "alphas", "scalar_mse_mean", "scalar_mse_std" (over noises, per alpha),
        "scalar_mse_per_noise_at_1", "grid", "convex_mse" (len(grid) x len(grid), rows alpha1),
        "convex_line_max" (largest mean on alpha1 + alpha2 = 1), "pairs" (the [i, j] drawn, indices
        into the converged noises), "noise_norms", "synth_seconds", "heldout_images", "figure"}.

    Raises:
        NsvitError: m < 2, n_pairs above m (m - 1) / 2 (before the descent) or above m_converged
            (m_converged - 1) / 2, under 4 images (none to hold out, as
            :func:`~nsvit_fast.synth.synthesize` refuses for ``stop="heldout"``), settings under
            which the metrics are not held out (``stop="batch"`` without ``heldout_data``, ``cache=``)
            or a streamed folder, a setting fig5 sets itself, fewer than 2 noises reaching eps, bad
            data or settings, or an unwritable ``out``.
    """
    _refuse_own_keys("fig5", synth, {"num_noises": "pass m=N instead",
                                     "progress": "it runs without a progress bar; drop progress="})
    out = check_output_dir(out, "out", ("fig5_properties.png", "fig5_properties.json"))  # before the descent
    cuda = next(parts.parameters()).device.type == "cuda"
    m = (100 if cuda else 24) if m is None else check_count("m", m, 2)
    n_pairs = check_count("n_pairs", n_pairs)
    if n_pairs > m * (m - 1) // 2:
        raise NsvitError(f"n_pairs {n_pairs} is more than the {m * (m - 1) // 2} distinct pairs of m = {m} noises")
    synth = {"stop": "heldout", "batch_size": 64, **synth}
    held = _fig5_heldout(parts, data, synth, eps, m, seed)  # the images synthesize measures on: checked up front
    bank = synthesize(parts, data, eps=eps, num_noises=m, seed=seed, progress=False, **synth)
    V = bank.noises[bank.converged]
    if V.shape[0] < 2:
        raise NsvitError(f"only {V.shape[0]} of {m} noises reached ε {bank.meta['eps']:g} within max_steps "
                         f"{bank.meta['max_steps']}: raise ε (--eps) or, from Python, fig5(..., max_steps=N)")
    k = V.shape[0]
    if n_pairs > k * (k - 1) // 2:
        raise NsvitError(f"n_pairs {n_pairs} is more than the {k * (k - 1) // 2} distinct pairs of the {k} of {m} "
                         f"noises that reached ε {eps:g}: give fewer pairs (--pairs) or raise max_steps")
    dev = next(parts.parameters()).device
    cache = CleanCache(parts, held, dev)
    V = V.to(dev)
    alphas = [round(0.1 * i, 1) for i in range(21)]
    scal = []
    for a in alphas:
        mse, _ = noise_effect(parts, V, cache, scales=torch.full((V.shape[0],), a, device=dev))
        scal.append((float(mse.mean()), float(mse.std()) if V.shape[0] > 1 else 0.0, mse.cpu().tolist()))
    g = torch.Generator().manual_seed(seed)
    every = list(itertools.combinations(range(k), 2))  # distinct unordered pairs, drawn without replacement
    pairs = [every[i] for i in torch.randperm(len(every), generator=g)[:n_pairs].tolist()]
    grid = [round(0.1 * i, 1) for i in range(11)]
    heat = torch.zeros(len(grid), len(grid))
    for i, a1 in enumerate(grid):
        combos = torch.stack([a1 * V[p] + a2 * V[q] for p, q in pairs for a2 in grid])
        mse, _ = noise_effect(parts, combos, cache)
        heat[i] = mse.reshape(n_pairs, len(grid)).mean(0).cpu()
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    mean = [s[0] for s in scal]
    std = [s[1] for s in scal]
    a.plot(alphas, mean, "o-", ms=3, label=f"MSE-prob of αv (mean over {V.shape[0]} noises)")
    a.fill_between(alphas, [x - s for x, s in zip(mean, std)], [x + s for x, s in zip(mean, std)], alpha=0.2)
    a.plot(alphas, [x * eps for x in alphas], "k--", lw=1, label="α·ε")
    a.axhline(eps, c="grey", lw=0.6, ls=":")
    a.set_xlabel("α")
    a.set_ylabel("MSE-prob (held-out)")
    a.set_title("(a) scalar multiplication", fontsize=9)
    a.legend(fontsize=7)
    im = b.imshow(heat.numpy(), origin="lower", extent=(-0.05, 1.05, -0.05, 1.05), cmap="viridis", aspect="auto")
    cs = b.contour(grid, grid, heat.numpy(), levels=[eps], colors="white", linewidths=1.2)
    b.clabel(cs, fmt={eps: f"ε={eps:g}"}, fontsize=7)
    b.plot([0, 1], [1, 0], "w:", lw=0.8)
    b.set_xlabel("α₂")
    b.set_ylabel("α₁")
    b.set_title(f"(b) α₁v_i + α₂v_j, mean over {n_pairs} pairs", fontsize=9)
    fig.colorbar(im, ax=b, label="MSE-prob")
    fig.tight_layout()
    png = save_figure(fig, out / "fig5_properties.png", dpi=110)
    plt.close(fig)
    on_line = [float(heat[i, len(grid) - 1 - i]) for i in range(len(grid))]  # alpha1 + alpha2 = 1
    res = {"study": "fig5", **_provenance(parts, bank), "m_requested": m, "m_converged": int(V.shape[0]),
           "n_pairs": n_pairs, "eps": eps,
           "device": dev.type, "alphas": alphas, "scalar_mse_mean": mean, "scalar_mse_std": std,
           "scalar_mse_per_noise_at_1": scal[alphas.index(1.0)][2], "grid": grid, "convex_mse": heat.tolist(),
           "convex_line_max": max(on_line), "pairs": [list(p) for p in pairs],
           "noise_norms": bank.norm[bank.converged].tolist(),
           "synth_seconds": bank.meta["seconds"], "heldout_images": int(held.shape[0]), "figure": str(png)}
    write_json(out / "fig5_properties.json", res)
    return res


def _check_record(rec, where: str, index: int) -> dict:
    """A log.jsonl round record as finetune writes it: an object whose ``round`` is its place
    (``index``: rounds 0, 1, 2 ... in order), and finite numbers (or null) in their ranges
    (RECORD_RANGES) for the series the figure draws and the JSON reports. A hand-edited line is
    named, not plotted (json reads NaN and Infinity, which the figure would drop without a word)."""
    from ..train.plots import RECORD_NUMBERS

    if not isinstance(rec, dict):
        raise NsvitError(f"{where}: a round record must be a JSON object, got {type(rec).__name__}")
    r = rec.get("round")
    if isinstance(r, bool) or not isinstance(r, int) or r != index:  # finetune writes 0, 1, 2 ... in order
        raise NsvitError(f"{where}: 'round' must be {index} (records are rounds 0, 1, 2 ... in order), "
                         f"got {str(r)[:40]!r}")
    for key in (*RECORD_NUMBERS, "train_loss"):
        v = rec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise NsvitError(f"{where}: {key!r} must be a number, got {str(v)[:40]!r}")
        if v is not None and (abs(v) > 1e300 if isinstance(v, int) else not math.isfinite(v)):
            raise NsvitError(f"{where}: {key!r} must be a finite number, got {str(v)[:40]}")
        lo, hi, whole = RECORD_RANGES.get(key, (None, None, False))
        if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)
                              or (whole and v != int(v))):
            raise NsvitError(f"{where}: {key!r} must be a{' whole' if whole else ''} number in [{lo:g}, "
                             f"{'inf' if hi is None else f'{hi:g}'}], got {v!r}")
    return rec


# what finetune writes: accuracies are fractions, steps are counts
RECORD_RANGES = {"val_acc": (0.0, 1.0, False), "val_acc_start": (0.0, 1.0, False), "synth_steps": (0, None, True),
                 "mse_prob": (0.0, 2.0, False), "noise_norm": (0.0, None, False), "train_loss": (0.0, None, False)}


@staged_writes()  # the figure and its JSON: both new, or both as they were
def trend(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """A Fig. 4-style trend: noise norm, MSE-prob, synthesis steps and val accuracy across a finetuning
    run's rounds (the paper's Fig. 4 has robustness scores in place of the last three).

    Args:
        run_dir: a finetuning output folder (it holds ``log.jsonl``, one JSON record per round).
        out: folder receiving ``fig4_trend.png`` and ``fig4_trend.json`` (default ``run_dir``).

    Returns:
        the JSON's contents: {"study": "trend", "run", "rounds", "series": {key: one value per round}
        for each of noise_norm, mse_prob, synth_steps, val_acc, train_loss the log has, "figure"},
        and "val_acc_start" (the starting model's val accuracy) when round 0's record has it.

    Raises:
        NsvitError: ``run_dir`` not a path, no log, an empty log or one with nothing to plot, a line
            that is not JSON or holds a bad value (naming it), or an unwritable ``out`` (checked
            before anything is written).
    """
    from ..train.plots import trend_figure

    if not isinstance(run_dir, (str, Path)):
        raise NsvitError(f"run_dir must be a finetuning output folder (a path), got {type(run_dir).__name__}")
    run = Path(run_dir)
    log = run / "log.jsonl"
    if not log.is_file():
        raise NsvitError(f"{run} holds no finetuning log (log.jsonl)")
    out = check_output_dir(out or run, "out", ("fig4_trend.png", "fig4_trend.json"))  # both, before either is written
    try:
        text = log.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NsvitError(f"{log} is not UTF-8 text (byte {e.start}): not a finetuning log") from None
    hist = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise NsvitError(f"{log}, line {i}: not a JSON record (a truncated log?)") from None
            hist.append(_check_record(rec, f"{log}, line {i}", len(hist)))
    if not hist:
        raise NsvitError(f"{log} is empty")
    keys = ("noise_norm", "mse_prob", "synth_steps", "val_acc", "train_loss")
    if not any(h.get(k) is not None for h in hist for k in keys):  # an empty figure, and rc 0
        raise NsvitError(f"{log}: no round records a value to plot ({', '.join(keys)}): not a finetuning log")
    png = trend_figure(hist, out / "fig4_trend.png", title=f"{run.name}: trend across rounds")
    res = {"study": "trend", "run": str(run), "rounds": len(hist),
           "series": {k: [h.get(k) for h in hist] for k in keys if any(k in h for h in hist)}, "figure": str(png)}
    if hist[0].get("val_acc_start") is not None:  # the starting model's, measured before round 0
        res["val_acc_start"] = hist[0]["val_acc_start"]
    write_json(out / "fig4_trend.json", res)
    return res


STUDIES = {"fig3": fig3, "fig5": fig5, "trend": trend}  # the studies by name, as ``nsvit-fast analyze`` takes them

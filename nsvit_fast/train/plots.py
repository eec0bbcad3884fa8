"""A Fig. 4-style trend: noise norm and a run's per-round metrics (val accuracy, MSE-prob, synthesis
steps) across finetuning rounds, each divided by its first value. The paper's Fig. 4 plots robustness
scores (Adversarial, OOD, their average) with the noise norm; a run does not measure those per round."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import save_figure

SERIES = (("noise_norm", "noise norm"), ("val_acc", "val accuracy"), ("mse_prob", "held-out MSE-prob"),
          ("synth_steps", "synthesis steps"))
START = "val_acc_start"  # round 0's record: the starting model's val accuracy, measured before round 0
RECORD_NUMBERS = (*(key for key, _ in SERIES), START)  # a round record's numbers (finite or null when present)


def mse_label(history: list[dict]) -> str:
    """What the rounds' ``mse_prob`` was measured on, for a column or legend: held-out images
    (given, or carved out under stop=heldout) or Algorithm 1's in-sample train sample (stop=batch);
    plain "MSE-prob" for a log that does not say (written before ``mse_prob_on``) or mixes them."""
    where = {h.get("mse_prob_on") for h in history if "mse_prob" in h}
    if where and where <= {"given", "carved"}:
        return "held-out MSE-prob"
    return "MSE-prob (train sample)" if where == {"train_sample"} else "MSE-prob"


def trend_figure(history: list[dict], path: str | Path, title: str = "", extra: dict | None = None) -> Path | None:
    """One line per metric present in ``history`` (and ``extra``: {label: values per round}),
    divided by its first value, against the round. Val accuracy starts at round -1, the starting
    model, when round 0's record holds ``val_acc_start`` (the paper's Fig. 4 divides by the initial
    value). A series whose first value is 0, missing or too small to divide by cannot be put on that
    scale: it is not drawn, and the legend says so. A round without a value leaves a gap in its
    line, named in the legend."""
    from ..viz import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    rounds = [h["round"] for h in history]  # from 0, as log.jsonl and the tables number them
    drawn = 0
    start = history[0].get(START) if history else None
    if start is not None and not (math.isfinite(start) and start > 0):  # nothing to divide by: round 0's scale
        start = None
    series = [(mse_label(history) if key == "mse_prob" else label, rounds, [h.get(key) for h in history])
              for key, label in SERIES]
    if start is not None:  # val accuracy from the starting model on
        series = [(label + " (from the start)", [-1, *x], [start, *v]) if label == "val accuracy" else (label, x, v)
                  for label, x, v in series]
    series += [(label, rounds, vals) for label, vals in (extra or {}).items()]
    for label, x, vals in series:
        if not vals or all(v is None for v in vals):
            continue  # a metric this run does not log (a plain run's noise norm)
        first = vals[0]  # the axis's "first value", not the first non-zero one
        ratios = [] if first is None or first == 0 else [math.nan if v is None else v / first for v in vals]
        gaps = [r for r, v in zip(x, vals) if v is None]
        if first is None or first == 0 or not all(math.isfinite(r) for r, v in zip(ratios, vals) if v is not None):
            why = "it has no first value" if first is None else f"the first value is {first:g}"
            ax.plot([], [], ls="none", label=f"{label}: not drawn ({why})")
        else:  # a round without the value leaves a gap in the line, named in the legend
            gap = f" (no value at round{'s' if len(gaps) > 1 else ''} {', '.join(map(str, gaps))})" if gaps else ""
            ax.plot(x, ratios, marker="o", ms=3, label=label + gap)
        drawn += 1
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole: no tick at round 0.5
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("round" + (" (-1: the starting model)" if start is not None else ""))
    ax.set_ylabel("value / first value")
    ax.set_title(title or "finetuning trend", fontsize=9)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out

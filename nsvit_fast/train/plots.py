"""The paper's Fig. 4: noise norm and metrics across finetuning rounds, each divided by its first value."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import save_figure

SERIES = (("noise_norm", "noise norm"), ("val_acc", "val accuracy"), ("mse_prob", "held-out MSE-prob"),
          ("synth_steps", "synthesis steps"))


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
    divided by its first round's value, against the round. A series whose first value is 0 (or not
    finite) cannot be put on that scale: it is not drawn, and the legend says so."""
    from ..viz import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    rounds = [h["round"] for h in history]  # from 0, as log.jsonl and the tables number them
    drawn = 0
    series = [(mse_label(history) if key == "mse_prob" else label, [h.get(key) for h in history])
              for key, label in SERIES]
    series += list((extra or {}).items())
    for label, vals in series:
        if not vals or any(v is None for v in vals):
            continue
        first = vals[0]  # the axis's "first round's value", not the first non-zero one
        if first == 0 or not math.isfinite(first):
            ax.plot([], [], ls="none", label=f"{label}: not drawn (first round's value is {first:g})")
        else:
            ax.plot(rounds, [v / first for v in vals], marker="o", ms=3, label=label)
        drawn += 1
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("round")
    ax.set_ylabel("value / first round's value")
    ax.set_title(title or "finetuning trend", fontsize=9)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out

"""Issue 16's metric bar over more seeds: pool noise_cost.json files run on different seeds.

    .venv/bin/python bench/pool_seeds.py bench/results/grow_search/noise_cost.json \
        bench/results/grow_search_seeds345/noise_cost.json

No runs: the per-seed Table-2 values of each file's models are pooled (seeds 0-2 and 3-5 give six
per model). For every ns variant present in all files, per metric: Algorithm 1's mean ± std over
the pooled seeds, the variant's, the issue's verdict (within one of Algorithm 1's stds) and the
signed gap in those stds (+ more robust, mCE flipped), and a paired t-test on the per-seed
differences (each seed's runs start from the same pretrained model and draw the same data order),
so a gap that three seeds could not tell from the seeds' spread can be told apart from it.
Timings are not pooled: the files may come from different machines (each file's machine is named, and
each metric's number of pooled seeds); files of different round counts are refused.
Writes bench/results/pooled_seeds.{json,md,png} (the figure: per-seed differences, in Algorithm 1's stds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy import stats

from nsvit_fast.eval.report import HEADLINE, Report
from nsvit_fast.io import write_json, write_text

from common import Parser, out_dir

RESULTS = Path(__file__).resolve().parent / "results"
ALG1 = "ns (Algorithm 1)"


def load(ap: argparse.ArgumentParser, path: str) -> tuple[list[int], Report, str, tuple]:
    """(seeds, report, machine, setting) of one noise_cost.json; the setting is (K, S, overrides)."""
    try:
        d = json.loads(Path(path).read_text())
        rep = Report.from_dict(d["report"])
        seeds = sorted({r.seed for r in rep.records})
        if not isinstance(d.get("rows"), list) or ALG1 not in rep.models or not seeds:
            raise ValueError("no Algorithm 1 runs")
        setting = (d["rounds"], d.get("model_steps", 40), tuple(d.get("overrides", [])))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # NsvitError is a ValueError
        ap.error(f"{path}: not a noise_cost.json ({type(e).__name__}: {e})")
    return seeds, rep, str(d.get("machine", "?")), setting


def per_seed(rep: Report, model: str, suite: str, setting: str) -> dict[int, float]:
    metric = HEADLINE.get(suite, "acc")
    return {r.seed: r.value for r in rep.records
            if r.model == model and r.suite == suite and r.setting == setting and r.metric == metric}


def compare(rep: Report, variant: str) -> list[dict]:
    """Per headline column, Algorithm 1 against ``variant`` over the seeds both have."""
    rows = []
    for suite, setting, label in rep.columns():
        a, b = per_seed(rep, ALG1, suite, setting), per_seed(rep, variant, suite, setting)
        seeds = sorted(a.keys() & b.keys())
        if len(seeds) < 2:
            continue
        xa, xb = [a[s] for s in seeds], [b[s] for s in seeds]
        sign = -1 if HEADLINE.get(suite, "acc") == "mce" else 1
        ma, sa, mb = statistics.mean(xa), statistics.stdev(xa), statistics.mean(xb)
        diff = sign * (mb - ma)
        gap = diff / sa if sa > 0 else (None if diff else 0.0)  # None: Algorithm 1's seeds agreed exactly
        d = [y - x for x, y in zip(xa, xb)]
        # all differences equal (e.g. both always 99.50): no spread to test against
        p = float(stats.ttest_rel(xb, xa).pvalue) if statistics.pstdev(d) > 0 else (1.0 if not any(d) else 0.0)
        rows.append({"metric": label, "metric_key": HEADLINE.get(suite, "acc"), "seeds": seeds,
                     "alg1_mean": round(ma, 2), "alg1_std": round(sa, 2),
                     "variant_mean": round(mb, 2), "variant_std": round(statistics.stdev(xb), 2),
                     "signed_diff": round(diff, 2), "per_seed_diff": [round(sign * x, 3) for x in d],
                     "gap_stds": None if gap is None else round(gap, 2),
                     "within_1std": abs(mb - ma) <= sa,
                     "paired_p": round(p, 4)})
    return rows


def figure(out: dict, path: Path) -> None:
    """pooled_seeds.png: per variant, each metric's per-seed differences to Algorithm 1 (dots; +
    more robust, mCE flipped) and their mean (bar), in units of Algorithm 1's std over the pooled
    seeds; the shaded band is the issue's bar, a star marks paired p < 0.05."""
    from nsvit_fast.io import save_figure
    from nsvit_fast.viz import pyplot

    plt = pyplot()
    vs = list(out["variants"])
    fig, axes = plt.subplots(1, len(vs), figsize=(5.5 * len(vs), 3.8), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], vs):
        rows = [r for r in out["variants"][v] if r["alg1_std"] > 0]  # a std of 0 has no unit to draw in
        ax.axhspan(-1, 1, color="0.88", label="within 1 std of Algorithm 1")
        ax.axhline(0, color="0.5", lw=0.8)
        for i, r in enumerate(rows):
            ys = [x / r["alg1_std"] for x in r["per_seed_diff"]]
            ax.bar(i, r["signed_diff"] / r["alg1_std"], 0.6, color="C0", alpha=0.6)
            ax.plot([i] * len(ys), ys, "o", ms=3, color="C3")
            if r["paired_p"] < 0.05:
                ax.text(i, max(ys + [0]) + 0.3, "*", ha="center", fontsize=11)
        ax.set_xticks(range(len(rows)), [r["metric"].replace("FGSM (eps=", "FGSM ").rstrip(")") for r in rows],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{v} vs Algorithm 1, seeds {out['seeds'][0]}-{out['seeds'][-1]} (dots: seeds, *: p < 0.05)",
                     fontsize=8)
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("(variant − Alg. 1) / Alg. 1 std, up = more robust", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def gap(r: dict) -> str:
    if r["gap_stds"] is None:
        return "+inf" if r["signed_diff"] > 0 else "−inf"
    return f"{r['gap_stds']:+.1f}"


def render(out: dict) -> str:
    lines = ["# Issue 16's metric bar over pooled seeds", "",
             f"No runs: per-seed values pooled from {', '.join(f'`{f}`' for f in out['files'])} "
             f"(seeds {out['seeds']}). Gap: (variant − Algorithm 1) / Algorithm 1's std, + when the variant is "
             "more robust (mCE flipped). p: paired t-test on the per-seed differences, two-sided, "
             "not corrected for the number of metrics."
             + (f" Renamed: {'; '.join(out['renamed'])}." if out.get("renamed") else ""), ""]
    if out.get("machines"):  # metrics only are pooled; the files may come from different machines
        lines += [f"K = {out['rounds']} rounds. " + "; ".join(f"`{f}`: {m}" for f, m in out["machines"].items()) + ".",
                  ""]
    for v, rows in out["variants"].items():
        n = sum(r["within_1std"] for r in rows)
        sig = [f"{r['metric']} ({'+' if r['signed_diff'] > 0 else '−'})" for r in rows if r["paired_p"] < 0.05]
        lines += [f"## {v}: within 1 std on {n} of {len(rows)}; paired p < 0.05 on "
                  f"{', '.join(sig) if sig else 'none'}", "",
                  "| metric | seeds | Algorithm 1 | variant | gap (stds) | within 1 std | paired p |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['metric']}{' (mCE)' if r['metric_key'] == 'mce' else ''} | {len(r['seeds'])} | "
                  f"{r['alg1_mean']:.2f} ± {r['alg1_std']:.2f} | {r['variant_mean']:.2f} ± {r['variant_std']:.2f} | "
                  f"{gap(r)} | {r['within_1std']} | {r['paired_p']:.3f} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = Parser(doc=__doc__)
    ap.add_argument("files", nargs="+", help="noise_cost.json files, each on its own seeds")
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="folder for pooled_seeds.json / .md")
    ap.add_argument("--rename", action="append", default=[], metavar="N:OLD=NEW",
                    help="call file N's (from 1) variant OLD NEW, where the files name one variant differently "
                         "(e.g. '1:ns fast=ns fast, floor' for a run made after floor became digits_fast's)")
    args = ap.parse_args()
    if len(args.files) < 2:
        ap.error("give at least two noise_cost.json files on different seeds")
    loaded = [load(ap, f) for f in args.files]
    for spec in args.rename:
        n, _, names = spec.partition(":")
        old, _, new = names.partition("=")
        if not n.isdigit() or not 1 <= int(n) <= len(loaded) or not old or not new:
            ap.error(f"--rename wants N:OLD=NEW with N a file's place (1-{len(loaded)}), got {spec!r}")
        rep = loaded[int(n) - 1][1]
        if old not in rep.models or new in rep.models:
            ap.error(f"--rename {spec!r}: file {n} has models {rep.models}")
        for r in rep.records:
            if r.model == old:
                r.model = new
    settings = {f: k for f, (_, _, _, k) in zip(args.files, loaded)}
    if len(set(settings.values())) > 1:  # seeds of another K, S or lim are another experiment
        ap.error("the files ran different settings (" + "; ".join(
            f"{f}: K {k}, S {s}, overrides {' '.join(o) or 'none'}" for f, (k, s, o) in settings.items())
            + "); pool runs of one setting")
    seen: set[int] = set()
    for f, (seeds, *_) in zip(args.files, loaded):
        if seen & set(seeds):
            ap.error(f"{f}: seeds {sorted(seen & set(seeds))} are in an earlier file too; pool disjoint seeds")
        seen |= set(seeds)
    rep = Report()
    for _, r, *_ in loaded:
        rep = rep.merge(r)
    # the ns variants every file ran
    common = set.intersection(*(set(r.models) for _, r, *_ in loaded))
    variants = [m for m in rep.models if m in common and m.startswith("ns") and m != ALG1]
    if not variants:  # the figure had no column to draw, after the JSON and .md were written
        ap.error(f"no ns variant besides {ALG1} is in every file (models: "
                 + "; ".join(f"{f}: {', '.join(r.models)}" for f, (_, r, *_) in zip(args.files, loaded)) + ")")
    out = {"files": args.files, "renamed": args.rename, "seeds": sorted(seen), "rounds": loaded[0][3][0],
           "machines": {f: m for f, (_, _, m, _) in zip(args.files, loaded)},
           "variants": {v: compare(rep, v) for v in variants}}
    write_json(args.out / "pooled_seeds.json", out)
    md = render(out)
    write_text(args.out / "pooled_seeds.md", md)
    figure(out, args.out / "pooled_seeds.png")
    print(md)


if __name__ == "__main__":
    main()

"""Does Algorithm 1 on fresh seeds pass issue 16's bar against Algorithm 1 on other seeds?

    .venv/bin/python bench/alg1_band.py bench/results/noise_cost.json bench/results/noise_bank_seeds345/noise_cost.json

No runs: reads two noise_cost.json files written by bench/noise_cost.py on different seeds. For each
Table-2 metric it puts the second file's Algorithm 1 mean against the first file's Algorithm 1
mean ± std (the bar "within one std" asks this of the fast noise), and the same the other way
round. A bar that Algorithm 1 fails against itself measures the seeds' spread, not the noise.
Writes bench/results/alg1_band.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from nsvit_fast.io import write_json, write_text

from common import Parser, out_dir

RESULTS = Path(__file__).resolve().parent / "results"


def load(ap: argparse.ArgumentParser, path: str) -> dict:
    try:
        d = json.loads(Path(path).read_text())
        # keyed by what was measured, not by its label: the mCE column was "C↓" before it became
        # "C↓ (vs pretrained)", and a match by label dropped it from the comparison
        metrics = {(m["suite"], m["setting"]): (float(m["alg1_mean"]), float(m["alg1_std"]), float(m["fast_mean"]),
                                                m["metric"]) for m in d["metrics"]}
        bad = next((k for k, (mean, std, fast, _) in metrics.items()
                    if not all(map(math.isfinite, (mean, std, fast))) or std < 0), None)
        if bad or not metrics:
            raise ValueError(f"metric {bad} is not finite or has a negative std" if bad else "no metrics")
        seeds = d["seeds"] if isinstance(d["seeds"], list) else str(d["seeds"]).split(",")
        return {"path": path, "seeds": str(d["seeds"]), "seed_set": {int(x) for x in seeds}, "metrics": metrics,
                "machine": str(d.get("machine", "?")),
                "setting": (d.get("rounds"), d.get("model_steps", 40), tuple(d.get("overrides", [])))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"{path}: not a noise_cost.json ({type(e).__name__}: {e})")


def against(band: dict, other: dict) -> list[dict]:
    rows = []
    for key, (mean, std, _, name) in band["metrics"].items():
        if key not in other["metrics"]:
            continue
        x = other["metrics"][key][0]
        rows.append({"metric": name, "band_mean": mean, "band_std": std, "other_alg1": x,
                     "within_1std": abs(x - mean) <= std})
    return rows


def main() -> None:
    ap = Parser(doc=__doc__)
    ap.add_argument("first", help="a noise_cost.json")
    ap.add_argument("second", help="a noise_cost.json on other seeds")
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="folder for alg1_band.json / .md")
    args = ap.parse_args()
    a, b = load(ap, args.first), load(ap, args.second)
    if a["seed_set"] & b["seed_set"]:  # compared as text, "2,3,4" passed against "0,1,2"
        ap.error(f"both files ran seeds {sorted(a['seed_set'] & b['seed_set'])}: the point is two disjoint sets")
    if a["setting"] != b["setting"]:  # a band from another K, S or lim is another experiment
        ap.error("the files ran " + " and ".join(f"K {k}, S {s}, overrides {' '.join(o) or 'none'}"
                                                 for k, s, o in (a["setting"], b["setting"]))
                 + ": compare runs of one setting")
    if set(a["metrics"]) != set(b["metrics"]):  # a metric one file lacks would leave the count short, unsaid
        only = sorted(set(a["metrics"]) ^ set(b["metrics"]))
        ap.error(f"the files measured different metrics ({', '.join(f'{s}:{t}' for s, t in only)} in one only): "
                 f"compare runs of one suite")
    out = {"pairs": [], "machines": {a["path"]: a["machine"], b["path"]: b["machine"]}, "rounds": a["setting"][0]}
    md = ["# Algorithm 1 against its own band on other seeds (issue 16's bar)", "",
          f"No runs: from the noise_cost.json files named, K = {a['setting'][0]}.", "",
          *[f"- `{f['path']}` (seeds {f['seeds']}): {f['machine']}" for f in (a, b)], ""]
    for band, other in ((a, b), (b, a)):
        rows = against(band, other)
        n = sum(r["within_1std"] for r in rows)
        out["pairs"].append({"band": band["path"], "band_seeds": band["seeds"], "other": other["path"],
                             "other_seeds": other["seeds"], "within": n, "of": len(rows), "rows": rows})
        md += [f"Algorithm 1 on seeds {other['seeds']} against Algorithm 1's band on seeds {band['seeds']}: "
               f"**{n} of {len(rows)}** within one std.", "",
               f"| metric | band (seeds {band['seeds']}) | Algorithm 1, seeds {other['seeds']} | within |",
               "|---|---|---|---|"]
        md += [f"| {r['metric']} | {r['band_mean']:.2f} ± {r['band_std']:.2f} | {r['other_alg1']:.2f} | "
               f"{'yes' if r['within_1std'] else 'no'} |" for r in rows]
        md.append("")
    outdir = args.out
    write_json(outdir / "alg1_band.json", out)
    write_text(outdir / "alg1_band.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

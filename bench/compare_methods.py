"""ns vs plain vs random (and ns with warm-started noise) on the embedded digits setting, over seeds.

    .venv/bin/python bench/compare_methods.py --seeds 0,1,2

Same budget for every method (configs/digits.yaml: K rounds x S steps). random matches the per-round
norm of the same seed's ns run (random.match=norm, the norm-matched reading of the paper's Table 4
control); random_eps is the epsilon-matched reading (random.match=eps, the method's default: each
round's Gaussian scaled to just inside synth.eps). Each final model is scored on the
397 digits test images: clean, FGSM at 1/255 (the paper's), 4/255 and 8/255, PGD-10 at 4/255.
Writes bench/results/methods.json and methods.md (or to --out) (mean ± std over seeds) and prints the table.
CPU timings: run it on an idle machine.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import torch

from nsvit_fast import digits, load_model
from nsvit_fast.eval import accuracy, attack_accuracy
from nsvit_fast.io import write_json, write_text
from nsvit_fast.train import finetune
from nsvit_fast.train.methods import METHODS
from nsvit_fast.train.yamlcfg import load_run, parse_overrides

from common import Parser, cpu_line, listof, one_of, out_dir, seeds

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = [("clean", None, {}), ("fgsm_1", "fgsm", {"eps": 1 / 255}), ("fgsm_4", "fgsm", {"eps": 4 / 255}),
           ("fgsm_8", "fgsm", {"eps": 8 / 255}), ("pgd_4", "pgd", {"eps": 4 / 255})]


def score(parts, test) -> dict:
    out = {}
    for key, atk, kw in METRICS:
        out[key] = 100 * (accuracy(parts, test.images, test.labels) if atk is None
                          else attack_accuracy(parts, test.images, test.labels, atk, **kw))
    return out


def main() -> None:
    ap = Parser(doc=__doc__)
    ap.add_argument("--seeds", type=seeds, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    ap.add_argument("--config", default="digits", help="a config name or YAML path (default digits)")
    ap.add_argument("--variants", type=listof(one_of([*METHODS, "ns_warm", "random_eps"], "variant"), "variants"),
                    default=["ns", "ns_warm", "plain", "random"], help="comma-separated (default ns,ns_warm,plain,random)")
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="folder for methods.json / .md")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = ap.parse_args()
    if not args.config.strip():  # load_run('') is the built-in defaults (lr 1e-5, 20 rounds), not a config
        ap.error("--config is empty: name a config (digits) or a YAML file")
    run, cfg = ap.check(load_run, args.config, ap.check(parse_overrides, args.overrides))
    # the script finetunes digits_vit on digits whatever the config says: another model's config would
    # have run digits with its hyperparameters, recorded under its name
    for key, want in (("model", "digits_vit"), ("data", "digits:train")):
        if run[key] is None:  # the engine's default data / no model: not this script's setting
            ap.error(f"--config {args.config}: names no {key}; add `{key}: {want}` (this script runs {want} only)")
        if run[key] != want:
            ap.error(f"--config {args.config}: {key} is {run[key]!r}; this script runs {want} only")
    warnings.simplefilter("ignore")
    train, val, test = digits("train"), digits("val"), digits("test")
    rows = []
    base = load_model("digits_vit")
    rows.append({"variant": "pretrained", "seed": None, **score(base, test)})
    for seed in args.seeds:
        ns_norms = None
        for variant in args.variants:
            parts = load_model("digits_vit")
            kw = dict(seed=seed)
            if variant == "ns_warm":
                kw.update(method="ns", noise_init="warm")
            elif variant == "random_eps":
                kw.update(method="random", **{"random.match": "eps"})
            else:
                kw.update(method=variant)
            t0 = time.perf_counter()
            if variant == "random":
                kw["random.match"] = "norm"
                if ns_norms:
                    kw["random.norms"] = ns_norms
            res = finetune(parts, train, cfg, val_data=val, progress=False, device="cpu", **kw)  # CPU, as labelled
            secs = time.perf_counter() - t0
            if variant == "ns":
                ns_norms = [h["noise_norm"] for h in res.history]
            h = res.history
            row = {"variant": variant, "seed": seed, "seconds": round(secs, 1),
                   # None (printed –) where no round synthesised: plain, random's draws, random_eps's scaling
                   "synth_seconds": (round(sum(x["synth_seconds"] for x in h if "synth_seconds" in x), 1)
                                     if any("synth_seconds" in x for x in h) else None),
                   "synth_steps": [x.get("synth_steps") for x in h], "noise_norm": [round(x["noise_norm"], 1)
                                                                                   for x in h if "noise_norm" in x],
                   "heldout_mse": [round(x["mse_prob"], 4) for x in h if "mse_prob" in x], **score(parts, test)}
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("synth_steps", "heldout_mse")}, flush=True)
    machine = f"{cpu_line()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    write_json(args.out / "methods.json", {"machine": machine, "config": args.config, "overrides": args.overrides,
                                          "rows": rows})
    md = summarise(rows, machine)
    write_text(args.out / "methods.md", md)
    print(md)


def summarise(rows: list[dict], machine: str) -> str:
    keys = [k for k, _, _ in METRICS]
    lines = [f"digits_vit, 397 test images, mean ± std over seeds. {machine}.", "",
             "| variant | seeds | " + " | ".join(keys) + " | run s | synthesis s | final noise norm |",
             "|---|---|" + "---|" * (len(keys) + 3)]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]

        def ms(vals):
            vals = [x for x in vals if x is not None]
            if not vals:
                return "–"
            return f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")

        lines.append(f"| {v} | {len(rs) if rs[0]['seed'] is not None else '–'} | "
                     + " | ".join(ms([r[k] for r in rs]) for k in keys) + " | "
                     + ms([r.get("seconds") for r in rs]) + " | " + ms([r.get("synth_seconds") for r in rs]) + " | "
                     + ms([r["noise_norm"][-1] if r.get("noise_norm") else None for r in rs]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

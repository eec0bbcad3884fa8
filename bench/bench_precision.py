"""bf16 (or any precision) against fp32: step time of the ns finetuning step and of the synthesis
step, on digits_vit and ViT-S/16 at 224 px (timm, random init: no download).

    .venv/bin/python bench/bench_precision.py [--device cpu] [--precisions fp32,bf16] [--repeats 5]
    .venv/bin/python bench/bench_precision.py --quick --out /tmp/r   # a seconds-long smoke run

The ns step is what the finetune engine runs per model step: clean and noisy views as one fused 2B
batch (``fused_views``), CE on both, backward, AdamW (lr 0, so every variant sees the same weights).
The synthesis step is the fast mode's (``descend``): the noisy forward of a batch of cached clean
tokens and the input-only backward, weights frozen. Both run under ``Runtime.autocast`` of the
precision; the noise, its optimiser and the losses stay fp32, as in the engines.

Precisions are interleaved repeat by repeat (ABAB...) in one process on the same model, batch and
noise, after one warm-up step each; the table reports medians and the ratio to fp32. Writes
<out>/<device kind>/precision.{json,md} (``--out`` defaults to bench/results), so a GPU run never
overwrites the CPU's results.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from common import (Parser, add_runtime_args, check_quick_out, count, listof, machine_line, ns_step, one_of, out_dir,
                    sync, write_results)

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = {  # model -> batch for both steps, steps per timing
    "digits_vit": dict(batch=128, steps=10),
    "vit_small_patch16_224": dict(batch=8, steps=2),
}
QUICK = dict(batch=8, steps=1)


def setup(name: str, batch: int, device: torch.device):
    from nsvit_fast import digits, load_model, synthetic

    torch.manual_seed(0)
    parts = load_model(name).to(device)
    if name == "digits_vit":
        ds = digits("train")
    else:  # random init, seeded synthetic 224 px images
        ds = synthetic(n=2 * batch, num_classes=parts.num_classes, img_size=224, seed=0)
    return parts, ds.images[:batch], ds.labels[:batch]


def ns_step_ms(parts, opt, x, y, noise, rt, n: int) -> float:
    """Mean ms of ``n`` ns finetuning steps under ``rt``'s precision."""
    parts.train()
    sync(rt)
    t0 = time.perf_counter()
    with rt.matmul_mode():
        for _ in range(n):
            ns_step(parts, opt, x, y, noise, rt)
    sync(rt)
    return (time.perf_counter() - t0) / n * 1e3


def synth_step_ms(parts, x, rt, n: int) -> float:
    """Mean ms of ``n`` fast-mode synthesis steps (weights frozen, clean tokens cached) under ``rt``."""
    from nsvit_fast.synth.cache import CleanCache
    from nsvit_fast.synth.engine import SynthConfig, SynthLog, descend, frozen

    cfg = SynthConfig(eps=1e-12, max_steps=n, batch_size=x.shape[0], lim=3.0, mode="fast", check_every=n)
    v0 = torch.zeros(1, *parts.token_shape).uniform_(-cfg.lim, cfg.lim, generator=torch.Generator().manual_seed(0))
    cache = CleanCache(parts, x, rt.device, autocast=rt.autocast)
    with frozen(parts), rt.matmul_mode():
        cache.all()  # steady state: clean values computed once per round, not per step
        sync(rt)
        t0 = time.perf_counter()
        descend(parts, x, v0, cfg, rt.device, None, SynthLog(None, n, False, ""), cache)
        sync(rt)
    return (time.perf_counter() - t0) / n * 1e3


def bench_model(name: str, precisions: list[str], repeats: int, device, quick: bool) -> dict:
    from nsvit_fast.runtime import Runtime

    s = QUICK if quick else SETTINGS[name]
    parts, x, y = setup(name, s["batch"], device)
    x, y = x.to(device), y.to(device)
    noise = (torch.rand(parts.token_shape, generator=torch.Generator().manual_seed(1)) * 2 - 1).mul(3.0).to(device)
    opt = torch.optim.AdamW(parts.parameters(), lr=0.0)  # lr 0: the weights stay put across variants
    rts = {p: Runtime.create(device, p) for p in precisions}
    ft = {p: [] for p in precisions}
    sy = {p: [] for p in precisions}
    for p, rt in rts.items():  # warm-up: first-call kernel selection and allocation
        ns_step_ms(parts, opt, x, y, noise, rt, 1)
        synth_step_ms(parts, x, rt, 1)
    for _ in range(repeats):  # interleaved: fp32, bf16, fp32, bf16, ...
        for p, rt in rts.items():
            ft[p].append(ns_step_ms(parts, opt, x, y, noise, rt, s["steps"]))
            sy[p].append(synth_step_ms(parts, x, rt, s["steps"]))
    row = {"model": name, "batch_size": s["batch"], "steps_per_timing": s["steps"], "repeats": repeats}
    base = precisions[0]
    for p in precisions:
        row[f"ns_step_ms_{p}"] = round(statistics.median(ft[p]), 2)
        row[f"synth_step_ms_{p}"] = round(statistics.median(sy[p]), 2)
    for p in precisions[1:]:
        row[f"ns_step_{p}_over_{base}"] = round(row[f"ns_step_ms_{p}"] / row[f"ns_step_ms_{base}"], 3)
        row[f"synth_step_{p}_over_{base}"] = round(row[f"synth_step_ms_{p}"] / row[f"synth_step_ms_{base}"], 3)
    return row


def table(rows: list[dict], precisions: list[str], machine: str) -> str:
    base = precisions[0]
    head = ["model", "batch"] + [f"ns step ms {p}" for p in precisions] + [f"{p}/{base}" for p in precisions[1:]] \
        + [f"synth step ms {p}" for p in precisions] + [f"{p}/{base} " for p in precisions[1:]]
    lines = [f"Machine: {machine}. Medians of interleaved repeats.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["batch_size"]] + [r[f"ns_step_ms_{p}"] for p in precisions] \
            + [r[f"ns_step_{p}_over_{base}"] for p in precisions[1:]] + [r[f"synth_step_ms_{p}"] for p in precisions] \
            + [r[f"synth_step_{p}_over_{base}"] for p in precisions[1:]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from nsvit_fast.runtime import device_kind

    ap = Parser(doc=__doc__)
    add_runtime_args(ap, precision=False)
    ap.add_argument("--precisions", type=listof(str, "precisions"), default=["fp32", "bf16"],
                    help="comma-separated; the first is the baseline (default fp32,bf16)")
    ap.add_argument("--models", type=listof(one_of(SETTINGS, "model"), "models"), default=list(SETTINGS),
                    help=f"comma-separated (default {','.join(SETTINGS)})")
    ap.add_argument("--repeats", type=count(1), default=5)
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="results root; files go to OUT/<device kind>/")
    ap.add_argument("--quick", action="store_true", help="digits_vit, batch 8, 1 step, 1 repeat: a smoke run")
    args = ap.parse_args(argv)
    check_quick_out(ap, args)
    precisions = args.precisions
    rts = [ap.runtime(args.device, p) for p in precisions]  # the first bad one is the one error line
    dev = rts[0].device
    warnings.simplefilter("ignore")
    models = ["digits_vit"] if args.quick else args.models
    repeats = 1 if args.quick else args.repeats
    rows = [bench_model(m, precisions, repeats, dev, args.quick) for m in models]
    machine = machine_line(rts[0])
    out = args.out / device_kind(dev)
    write_results(out, "precision", {"machine": machine, "device": device_kind(dev), "precisions": precisions,
                                     "quick": args.quick, "results": rows}, table(rows, precisions, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())

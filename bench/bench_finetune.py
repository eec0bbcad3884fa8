"""Finetuning benchmark: the ns step with two separate forwards (the official way) vs the fused 2B
batch; rounds per minute per method; synthesis time over K rounds with fresh vs warm noise.

    .venv/bin/python bench/bench_finetune.py [--repeats 5] [--rounds 6]
    .venv/bin/python bench/bench_finetune.py --device cuda --precision bf16
    .venv/bin/python bench/bench_finetune.py --quick --out /tmp/r   # tiny settings: a smoke run

All on the digits model and configs/digits.yaml, in one process. The two step variants are
interleaved, repeat by repeat (medians); rounds per minute (model load included) and fresh vs warm
are one run each, one after another.
``--device`` (auto, cpu, cuda, cuda:N) and ``--precision`` (fp32, tf32, bf16, fp16) go through
nsvit_fast.runtime.Runtime, as in the engines. Writes <out>/<device kind>/finetune.json and
finetune.md (finetune-<precision>.* for precisions other than fp32; ``--out`` defaults to
bench/results), so a GPU run never overwrites the CPU's results, and prints the table.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from nsvit_fast import digits, load_model
from nsvit_fast.runtime import Runtime, device_kind
from nsvit_fast.train import finetune
from nsvit_fast.train.yamlcfg import load_run

from common import Parser, add_runtime_args, check_quick_out, count, cpu_line, ns_step, out_dir, sync, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def step_ms(parts, opt, x, y, v, fused: bool, n: int, rt: Runtime | None = None) -> float:
    rt = rt or Runtime.create("cpu")
    parts.train()
    sync(rt)
    t0 = time.perf_counter()
    with rt.matmul_mode():
        for _ in range(n):
            ns_step(parts, opt, x, y, v, rt, fused)
    sync(rt)
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
    ap = Parser(doc=__doc__)
    ap.add_argument("--repeats", type=count(1), default=5)
    ap.add_argument("--steps", type=count(1), default=20)
    ap.add_argument("--rounds", type=count(1), default=6, help="rounds for fresh vs warm synthesis time")
    add_runtime_args(ap)
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="results root; files go to OUT/<device kind>/")
    ap.add_argument("--quick", action="store_true",
                    help="batch 8, 1 step, 1 repeat, 1-round ns runs of 2 model and 2 synthesis steps: a smoke "
                         "run, not a measurement")
    args = ap.parse_args(argv)
    check_quick_out(ap, args)
    rt = ap.runtime(args.device, args.precision)
    warnings.simplefilter("ignore")
    _, cfg = load_run("digits")
    run_kw = dict(device=rt.device, precision=rt.precision, progress=False)
    methods, rpm_rounds, steps, repeats, rounds = ("ns", "plain", "random", "pgd", "trades"), 2, args.steps, \
        args.repeats, args.rounds
    if args.quick:
        cfg = dataclasses.replace(cfg, batch_size=8, model_steps=2)
        run_kw.update(synth={"max_steps": 2, "batch_size": 8, "heldout": 8})
        methods, rpm_rounds, steps, repeats, rounds = ("ns",), 1, 1, 1, 1
    train = digits("train")
    parts = load_model("digits_vit").to(rt.device)
    opt = torch.optim.AdamW(parts.parameters(), lr=0.0)  # lr 0: weights stay put across variants
    x, y = train.images[:cfg.batch_size].to(rt.device), train.labels[:cfg.batch_size].to(rt.device)
    v = torch.randn(parts.token_shape).mul(4).to(rt.device)
    two, fused = [], []
    for f in (False, True):  # each path's first calls (allocator, kernel choice) untimed: the two-forward path ran cold
        step_ms(parts, opt, x, y, v, f, 1 if args.quick else 3, rt)
    for _ in range(repeats):
        two.append(step_ms(parts, opt, x, y, v, False, steps, rt))
        fused.append(step_ms(parts, opt, x, y, v, True, steps, rt))
    row = {"precision": rt.precision, "batch_size": cfg.batch_size, "two_forwards_ms": round(statistics.median(two), 2),
           "fused_ms": round(statistics.median(fused), 2)}
    row["fused_over_two_forwards"] = round(row["fused_ms"] / row["two_forwards_ms"], 3)

    rpm = {}
    ns_norms = None
    for method in methods:
        t0 = time.perf_counter()
        res = finetune(load_model("digits_vit"), train, cfg, method=method, rounds=rpm_rounds, noise_init="fresh",
                       **run_kw, **({"random.match": "norm", "random.norms": ns_norms} if method == "random" else {}))
        if method == "ns":
            ns_norms = [h["noise_norm"] for h in res.history]
        rpm[method] = round(rpm_rounds / ((time.perf_counter() - t0) / 60), 2)
    row["rounds_per_minute"] = rpm

    for init in ("fresh", "warm"):
        res = finetune(load_model("digits_vit"), train, cfg, rounds=rounds, noise_init=init, **run_kw)
        row[f"{init}_synth_s"] = round(sum(h["synth_seconds"] for h in res.history), 1)
        row[f"{init}_final_norm"] = round(res.history[-1]["noise_norm"], 1)
        row[f"{init}_synth_steps"] = [h["synth_steps"] for h in res.history]
    row["rounds_for_synth"] = rounds
    dev = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else \
        cpu_line()
    machine = f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, {rt.precision}"
    out = args.out / device_kind(rt.device)
    stem = "finetune" if rt.precision == "fp32" else f"finetune-{rt.precision}"
    md = (f"digits_vit, configs/digits.yaml (batch {cfg.batch_size}, S = {cfg.model_steps}). {machine}.\n\n"
          "| two forwards ms/step | fused 2B ms/step | fused / two |\n|---|---|---|\n"
          f"| {row['two_forwards_ms']} | {row['fused_ms']} | {row['fused_over_two_forwards']} |\n\n"
          "| method | rounds per minute |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rpm.items())
          + f"\n| noise init | synthesis s over {rounds} rounds | steps per round | final norm |\n|---|---|---|---|\n"
          + "".join(f"| {i} | {row[f'{i}_synth_s']} | {row[f'{i}_synth_steps']} | {row[f'{i}_final_norm']} |\n"
                    for i in ("fresh", "warm")))
    write_results(out, stem, {"machine": machine, "device": device_kind(rt.device), "model": "digits_vit",
                              "quick": args.quick, **row}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

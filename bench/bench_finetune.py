"""Finetuning benchmark: the ns step with two separate forwards (the official way) vs the fused 2B
batch; rounds per minute per method; synthesis time over K rounds with fresh vs warm noise.

    .venv/bin/python bench/bench_finetune.py [--repeats 5] [--rounds 6]

All on the digits model and configs/digits.yaml, in one process, variants interleaved; medians.
Writes bench/results/finetune.json and finetune.md and prints the table. CPU numbers here.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from nsvit_fast import digits, load_model
from nsvit_fast.io import write_json, write_text
from nsvit_fast.train import finetune
from nsvit_fast.train.methods import fused_views
from nsvit_fast.train.yamlcfg import load_run

RESULTS = Path(__file__).resolve().parent / "results"


def step_ms(parts, opt, x, y, v, fused: bool, n: int) -> float:
    parts.train()
    t0 = time.perf_counter()
    for _ in range(n):
        if fused:
            z, zn = fused_views(parts, x, v)
        else:  # the official code: patch embedding and encoder twice
            z = parts.encode(parts.patch_embed(x))
            zn = parts.encode(parts.patch_embed(x) + v)
        loss = F.cross_entropy(z, y) + F.cross_entropy(zn, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=6, help="rounds for fresh vs warm synthesis time")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    _, cfg = load_run("digits")
    train = digits("train")
    parts = load_model("digits_vit")
    opt = torch.optim.AdamW(parts.parameters(), lr=0.0)  # lr 0: weights stay put across variants
    x, y = train.images[:cfg.batch_size], train.labels[:cfg.batch_size]
    v = torch.randn(parts.token_shape) * 4
    two, fused = [], []
    step_ms(parts, opt, x, y, v, True, 3)  # warm-up
    for _ in range(args.repeats):
        two.append(step_ms(parts, opt, x, y, v, False, args.steps))
        fused.append(step_ms(parts, opt, x, y, v, True, args.steps))
    row = {"batch_size": cfg.batch_size, "two_forwards_ms": round(statistics.median(two), 2),
           "fused_ms": round(statistics.median(fused), 2)}
    row["fused_over_two_forwards"] = round(row["fused_ms"] / row["two_forwards_ms"], 3)

    rpm = {}
    ns_norms = None
    for method in ("ns", "plain", "random", "pgd", "trades"):
        t0 = time.perf_counter()
        res = finetune(load_model("digits_vit"), train, cfg, method=method, rounds=2, noise_init="fresh",
                       progress=False, **({"random.norms": ns_norms} if method == "random" else {}))
        if method == "ns":
            ns_norms = [h["noise_norm"] for h in res.history]
        rpm[method] = round(2 / ((time.perf_counter() - t0) / 60), 2)
    row["rounds_per_minute"] = rpm

    for init in ("fresh", "warm"):
        res = finetune(load_model("digits_vit"), train, cfg, rounds=args.rounds, noise_init=init, progress=False)
        row[f"{init}_synth_s"] = round(sum(h["synth_seconds"] for h in res.history), 1)
        row[f"{init}_final_norm"] = round(res.history[-1]["noise_norm"], 1)
        row[f"{init}_synth_steps"] = [h["synth_steps"] for h in res.history]
    row["rounds_for_synth"] = args.rounds
    machine = f"CPU ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    write_json(RESULTS / "finetune.json", {"machine": machine, "model": "digits_vit", **row})
    md = (f"digits_vit, configs/digits.yaml (batch {cfg.batch_size}, S = {cfg.model_steps}). {machine}.\n\n"
          "| two forwards ms/step | fused 2B ms/step | fused / two |\n|---|---|---|\n"
          f"| {row['two_forwards_ms']} | {row['fused_ms']} | {row['fused_over_two_forwards']} |\n\n"
          "| method | rounds per minute |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rpm.items())
          + f"\n| noise init | synthesis s over {args.rounds} rounds | steps per round | final norm |\n|---|---|---|---|\n"
          + "".join(f"| {i} | {row[f'{i}_synth_s']} | {row[f'{i}_synth_steps']} | {row[f'{i}_final_norm']} |\n"
                    for i in ("fresh", "warm")))
    write_text(RESULTS / "finetune.md", md)
    print(md)


if __name__ == "__main__":
    main()

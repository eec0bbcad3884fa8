"""Synthesis benchmark: per-step time of the reference loop, the fast loop and the floor; time to ε
and norm of the paper vs the boundary schedule; peak memory of reference vs fast.

    .venv/bin/python bench/bench_synth.py                 # digits_vit and vit_small_patch32_224
    .venv/bin/python bench/bench_synth.py --models digits_vit --repeats 3
    .venv/bin/python bench/bench_synth.py --lims 3,4,6,8    # only the README's lim table (synth_lims.*)
    .venv/bin/python bench/bench_synth.py --device cuda --precision bf16
    .venv/bin/python bench/bench_synth.py --quick --out /tmp/r    # digits, 1 step: a smoke run

All variants of one model run in one process, interleaved repeat by repeat, on the same model,
batches and seed; the table reports medians over repeats. Peak memory is the growth of tensor
memory during two steps (CPU: torch.profiler's allocation records; CUDA: max_memory_allocated).
``--device`` (auto, cpu, cuda, cuda:N) and ``--precision`` (fp32, tf32, bf16, fp16) go through
nsvit_fast.runtime.Runtime, as in the engines: the model's forwards under its autocast, the noise
and losses fp32. Writes <out>/<device kind>/synth.json and synth.md (synth-<precision>.* for
precisions other than fp32; ``--out`` defaults to bench/results), so a GPU run never overwrites
the CPU's results, and prints the table.
Run it on an idle machine: a second busy process distorts CPU timings several-fold.
The reference is the official loop (clean logits under no_grad, weight gradients computed), both
modes on the official cosine schedule (SynthConfig defaults).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nsvit_fast import digits, load_model, synthetic
from nsvit_fast.io import write_json, write_text
from nsvit_fast.runtime import Runtime, device_kind
from nsvit_fast.synth.cache import CleanCache
from nsvit_fast.synth.engine import SynthConfig, SynthLog, descend, frozen, split_heldout, synthesize

from common import (POSITIVE, Parser, add_runtime_args, check_quick_out, count, cpu_line, listof, one_of, out_dir,
                    sync, write_results)

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = {  # model -> (data, batch, steps per timing, lim for time-to-ε)
    "digits_vit": dict(batch=128, steps=20, lim=6.0),
    "vit_small_patch32_224": dict(batch=16, steps=4, lim=3.0),
}
QUICK = dict(batch=8, steps=1, lim=6.0)  # --quick: digits_vit only, a smoke run of every code path


def setup(name: str, rt: Runtime, quick: bool = False):
    torch.manual_seed(0)
    parts = load_model(name).to(rt.device)
    s = QUICK if quick else SETTINGS[name]
    if name == "digits_vit":
        data = digits("train").images
    else:  # no pretrained weights offline: random init, seeded synthetic 224 px images
        data = synthetic(n=4 * s["batch"], num_classes=10, img_size=224, seed=0).images
    return parts, data, s


def time_reference(parts, data, cfg, steps, rt: Runtime):
    """The official loop has no autocast of its own: under bf16/fp16 its forwards run in ``rt``'s."""
    log = SynthLog(None, steps, False, "")
    with frozen(parts, freeze=False), rt.matmul_mode(), rt.autocast():
        sync(rt)
        t0 = time.perf_counter()
        descend(parts, data, torch.zeros(1, *parts.token_shape).uniform_(-cfg.lim, cfg.lim),
                dataclasses.replace(cfg, mode="reference"), rt.device, None, log)
        sync(rt)
        return (time.perf_counter() - t0) / steps * 1e3


def time_fast(parts, data, cfg, steps, cache, rt: Runtime):
    log = SynthLog(None, steps, False, "")
    with frozen(parts), rt.matmul_mode():
        cache.all()  # steady state: the clean tokens were computed in an earlier epoch or round
        sync(rt)
        t0 = time.perf_counter()
        descend(parts, data, torch.zeros(1, *parts.token_shape).uniform_(-cfg.lim, cfg.lim),
                dataclasses.replace(cfg, mode="fast"), rt.device, None, log, cache)
        sync(rt)
        return (time.perf_counter() - t0) / steps * 1e3


def time_floor(parts, data, cfg, steps, cache, rt: Runtime):
    """One noisy forward + one input-only backward per step, nothing else (weights frozen, u cached)."""
    n = data.shape[0]
    with frozen(parts), rt.matmul_mode():
        cache.all()
        v = torch.zeros(1, *parts.token_shape, device=rt.device).uniform_(-cfg.lim, cfg.lim)
        sync(rt)
        t0 = time.perf_counter()
        for t in range(steps):
            idx = (torch.arange(t * cfg.batch_size, (t + 1) * cfg.batch_size) % n).to(rt.device)
            u, z, _ = cache.u[idx], cache.z[idx], None
            vc = v.requires_grad_(True)
            with rt.autocast():
                zn = parts.encode(u + vc)
            g, = torch.autograd.grad(torch.linalg.vector_norm(zn.float() - z, dim=-1).mean(), vc)
            v = (vc - 0.1 * g.sign()).detach()
        sync(rt)
        return (time.perf_counter() - t0) / steps * 1e3


def peak_mb(parts, data, cfg, mode: str, cache, rt: Runtime) -> float:
    """Peak tensor memory (MB) above the starting point during ``cfg.max_steps`` steps of ``mode``.

    CUDA: max_memory_allocated. CPU: the allocator's running total from torch.profiler's memory
    records (profile_memory=True), which counts tensors only, not the Python heap."""
    log = SynthLog(None, cfg.max_steps, False, "")
    v0 = torch.zeros(1, *parts.token_shape).uniform_(-cfg.lim, cfg.lim)
    with frozen(parts, freeze=mode == "fast"):
        cache.all()
        mcfg = dataclasses.replace(cfg, mode=mode)

        def run():
            with rt.matmul_mode(), (rt.autocast() if mode == "reference" else contextlib.nullcontext()):
                descend(parts, data, v0, mcfg, rt.device, None, log, cache)

        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
            base = torch.cuda.memory_allocated(rt.device)
            run()
            return (torch.cuda.max_memory_allocated(rt.device) - base) / 2**20
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        with tempfile.TemporaryDirectory() as d:
            prof.export_chrome_trace(f"{d}/t.json")
            events = json.load(open(f"{d}/t.json"))["traceEvents"]
        mem = [e["args"] for e in sorted((e for e in events if e.get("name") == "[memory]"),  # in time order
                                         key=lambda e: (e.get("ts", 0), e["args"].get("Ev Idx", 0)))
               if "Total Allocated" in e.get("args", {})]
        if not mem:
            return float("nan")
        base = mem[0]["Total Allocated"] - mem[0].get("Bytes", 0)  # before the first record: its own bytes count
        return (max(a["Total Allocated"] for a in mem) - base + 0.0) / 2**20


def bench_model(name: str, repeats: int, time_to_eps: bool = True, rt: Runtime | None = None,
                quick: bool = False) -> dict:
    rt = rt or Runtime.create("cpu")
    parts, data, s = setup(name, rt, quick)
    cfg = SynthConfig(eps=1e-12, max_steps=s["steps"], batch_size=s["batch"], lim=s["lim"])
    cache = CleanCache(parts, data, rt.device, autocast=rt.autocast)
    ref, fast, floor = [], [], []
    if not quick:  # first calls (allocator, kernel choice, the cache's fill) untimed: the first repeat ran cold
        time_reference(parts, data, cfg, s["steps"], rt)
        time_fast(parts, data, cfg, s["steps"], cache, rt)
        time_floor(parts, data, cfg, s["steps"], cache, rt)
    for _ in range(repeats):  # interleaved, side by side
        ref.append(time_reference(parts, data, cfg, s["steps"], rt))
        fast.append(time_fast(parts, data, cfg, s["steps"], cache, rt))
        floor.append(time_floor(parts, data, cfg, s["steps"], cache, rt))
    r, f, fl = statistics.median(ref), statistics.median(fast), statistics.median(floor)
    row = {"model": name, "precision": rt.precision, "batch_size": s["batch"], "reference_ms": round(r, 2),
           "fast_ms": round(f, 2),
           "floor_ms": round(fl, 2), "fast_over_floor": round(f / fl, 3), "reference_over_fast": round(r / f, 3)}
    warnings.simplefilter("ignore")
    if time_to_eps:
        row.update(schedules(parts, data, name, s, rt))
    row["lim"] = s["lim"]
    mcfg = SynthConfig(eps=1e-12, max_steps=2, batch_size=s["batch"], lim=s["lim"])
    row["reference_peak_mb"] = round(peak_mb(parts, data, mcfg, "reference", cache, rt), 1)
    row["fast_peak_mb"] = round(peak_mb(parts, data, mcfg, "fast", cache, rt), 1)
    row["fast_over_reference_peak"] = round(row["fast_peak_mb"] / max(row["reference_peak_mb"], 1e-9), 3)
    return row


def schedules(parts, data, name: str, s: dict, rt: Runtime) -> dict:
    """Time to ε, steps, norm and held-out MSE of the paper and the boundary schedule."""
    row, sched = {}, {}
    # the same 256 (or a quarter) seeded images held out for both schedules, so both report held-out
    # figures (stop=batch would otherwise train on all images and measure in-sample)
    train, held = split_heldout(digits("train").images if name == "digits_vit" else data, 256, 0)
    for schedule in ("paper", "boundary"):
        bank = synthesize(parts, train, heldout_data=held, lim=s["lim"],
                          batch_size=s["batch"], schedule=schedule, progress=False, runtime=rt,
                          max_steps=3000 if name == "digits_vit" else 50)
        sched[schedule] = bank
    for k, b in sched.items():
        row[f"{k}_time_to_eps_s"] = round(float(b.meta["seconds"]), 2)
        row[f"{k}_norm"] = round(float(b.norm[0]), 2)
        row[f"{k}_heldout_mse"] = round(float(b.mse_prob[0]), 4)
        row[f"{k}_steps"] = int(b.steps[0])
    return row


def lim_rows(lims: list[float], max_steps: int = 3000, done=None, rt: Runtime | None = None) -> list[dict]:
    """The README's lim table: paper vs boundary schedule on digits_vit (fast mode, eps 0.03, batch
    128, seed 0), held-out figures on the same 256 seeded images as bench_model. ``done(rows)`` is
    called after each lim (partial results survive a long run)."""
    rt = rt or Runtime.create("cpu")
    parts = load_model("digits_vit").to(rt.device)
    train, held = split_heldout(digits("train").images, 256, 0)
    warnings.simplefilter("ignore")
    rows = []
    for lim in lims:
        row = {"lim": lim}
        for schedule in ("paper", "boundary"):
            b = synthesize(parts, train, heldout_data=held, lim=lim, batch_size=128, schedule=schedule,
                           max_steps=max_steps, progress=False, runtime=rt)
            row.update({f"{schedule}_steps": int(b.steps[0]), f"{schedule}_converged": bool(b.converged[0]),
                        f"{schedule}_norm": round(float(b.norm[0]), 1),
                        f"{schedule}_heldout_mse": round(float(b.mse_prob[0]), 4),
                        f"{schedule}_seconds": round(float(b.meta["seconds"]), 2)})
        rows.append(row)
        if done:
            done(rows)
    return rows


def lim_table(rows: list[dict], machine: str) -> str:
    def cell(r, k):
        steps = f"{r[k + '_steps']}" if r[k + "_converged"] else f"did not converge in {r[k + '_steps']}"
        return f"{steps}, {r[k + '_norm']}, {r[k + '_heldout_mse']}"

    lines = [f"Machine: {machine}", "", "| lim | paper: steps, norm, held-out MSE | boundary: steps, norm, held-out MSE |"
             " paper s | boundary s |", "|---|---|---|---|---|"]
    lines += [f"| {r['lim']:g} | {cell(r, 'paper')} | {cell(r, 'boundary')} | {r['paper_seconds']} | "
              f"{r['boundary_seconds']} |" for r in rows]
    return "\n".join(lines) + "\n"


def table(rows: list[dict], machine: str) -> str:
    cols = [("model", "model"), ("batch_size", "batch"), ("reference_ms", "reference ms/step"),
            ("fast_ms", "fast ms/step"), ("floor_ms", "floor ms/step"), ("fast_over_floor", "fast/floor"),
            ("reference_over_fast", "reference/fast"), ("lim", "lim"), ("paper_steps", "paper steps"),
            ("paper_time_to_eps_s", "paper s to ε"), ("paper_norm", "paper norm"),
            ("paper_heldout_mse", "paper held-out MSE"), ("boundary_steps", "boundary steps"),
            ("boundary_time_to_eps_s", "boundary s to ε"), ("boundary_norm", "boundary norm"),
            ("boundary_heldout_mse", "boundary held-out MSE"), ("reference_peak_mb", "reference peak MB"),
            ("fast_peak_mb", "fast peak MB")]
    lines = [f"Machine: {machine}", "", "| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = Parser(doc=__doc__)
    ap.add_argument("--models", type=listof(one_of(SETTINGS, "model"), "models"), default=list(SETTINGS),
                    help=f"comma-separated (default {','.join(SETTINGS)})")
    ap.add_argument("--repeats", type=count(1), default=5)
    ap.add_argument("--lims", type=listof(POSITIVE, "numbers > 0"),
                    help="run only the lim table at these lims (comma-separated)")
    ap.add_argument("--no-time-to-eps", action="store_true",
                    help="skip the paper/boundary time-to-eps runs (their keys are then absent); for a busy machine")
    add_runtime_args(ap)
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="results root; files go to OUT/<device kind>/")
    ap.add_argument("--quick", action="store_true",
                    help="digits_vit, batch 8, 1 step, 1 repeat, no time to eps: a smoke run, not a measurement")
    args = ap.parse_args(argv)
    check_quick_out(ap, args)
    rt = ap.runtime(args.device, args.precision)
    out = args.out / device_kind(rt.device)
    suffix = "" if rt.precision == "fp32" else f"-{rt.precision}"
    dev = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else cpu_line()
    machine = f"{dev}, {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, " \
              f"{rt.precision}"
    if args.lims:
        def save(rows):
            write_json(out / f"synth_lims{suffix}.json", {"machine": machine, "results": rows})
            write_text(out / f"synth_lims{suffix}.md", lim_table(rows, machine))

        rows = lim_rows(args.lims, done=save, rt=rt)
        print(lim_table(rows, machine))
        return 0
    models = ["digits_vit"] if args.quick else args.models
    rows = [bench_model(m, 1 if args.quick else args.repeats, not (args.no_time_to_eps or args.quick), rt, args.quick)
            for m in models]
    write_results(out, f"synth{suffix}", {"machine": machine, "device": device_kind(rt.device),
                                          "precision": rt.precision, "quick": args.quick, "results": rows},
                  table(rows, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())

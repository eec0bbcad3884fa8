"""What a cheaper stop test could save: the held-out confirmations' share of the fast noise's round 0.

    .venv/bin/python bench/confirm_share.py --seeds 0,1,2        # about 20 s on 2 CPU cores

Issue 16 asked for a stop test confirmed on a small batch first, on the full set only when that
passes. The engine already works that way: the batch test comes from the step's own forward
(``prob_shift``, no extra pass), and the held-out set is read only when a batch passes, then not
again for ``heldout_every`` steps. This measures what the held-out reads cost in round 0 of
``digits_fast`` (boundary schedule, held-out stop), where every descent step of the fast noise
now is: the time inside the confirmation callback against the whole descent loop, per seed.
Writes bench/results/confirm_share.{json,md}. CPU timings: run it on an idle machine.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

import nsvit_fast.synth.engine as engine
from nsvit_fast import digits, load_model
from nsvit_fast.io import write_json, write_text
from nsvit_fast.train.yamlcfg import load_run

from common import Parser, cpu_model, out_dir, seeds

RESULTS = Path(__file__).resolve().parent / "results"


def measure(seed: int, cfg) -> dict:
    s = {"confirm_s": 0.0, "calls": 0, "passed": 0, "loop_s": 0.0, "steps": 0}
    inner = engine._fast

    def timed_fast(parts, cache, v0, scfg, device, confirm, log, lam=None):
        def timed(v):
            t0 = time.perf_counter()
            ok = confirm(v)
            s["confirm_s"] += time.perf_counter() - t0
            s["calls"] += 1
            s["passed"] += int(ok.sum())
            return ok
        t0 = time.perf_counter()
        out = inner(parts, cache, v0, scfg, device, None if confirm is None else timed, log, lam)
        s["loop_s"] += time.perf_counter() - t0
        s["steps"] = int(out[1].max())
        return out

    engine._fast = timed_fast
    try:
        engine.synthesize(load_model("digits_vit"), digits("train"),
                          dataclasses.replace(cfg.synth, seed=seed, num_noises=1), progress=False)
    finally:
        engine._fast = inner
    return {"seed": seed, "descent_steps": s["steps"], "confirmations": s["calls"], "passed": s["passed"],
            "confirm_seconds": round(s["confirm_s"], 3), "loop_seconds": round(s["loop_s"], 3),
            "confirm_share": round(s["confirm_s"] / s["loop_s"], 4)}


def main() -> None:
    ap = Parser(doc=__doc__)
    ap.add_argument("--seeds", type=seeds, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="folder for confirm_share.json / .md")
    args = ap.parse_args()
    _, cfg = load_run("digits_fast", {})
    measure(args.seeds[0], cfg)  # warm-up: first-call costs are not the confirmation's
    rows = [measure(seed, cfg) for seed in args.seeds]
    machine = f"CPU ({cpu_model()}, {os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads"
    write_json(args.out / "confirm_share.json", {"machine": machine, "rows": rows})
    md = ["# Held-out confirmations in the fast noise's round 0 (digits_fast)", "",
          f"{machine}. Seconds inside the confirmation callback against the whole descent loop.", "",
          "| seed | descent steps | confirmations (passed) | confirm s | loop s | share |", "|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['descent_steps']} | {r['confirmations']} ({r['passed']}) | {r['confirm_seconds']:.2f} | "
           f"{r['loop_seconds']:.2f} | {100 * r['confirm_share']:.1f} % |" for r in rows]
    write_text(args.out / "confirm_share.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Loader benchmark: images/s the streaming ImageFolder loader delivers (0, 1, 2 workers, the
official RandomResizedCrop + flip) next to the images/s one ns step of ViT-S/16 at 224 px consumes,
and the peak RSS of a streaming pass over N vs 10 N JPEG images.

    .venv/bin/python bench/bench_loader.py [--images 2000] [--device auto] [--precision fp32]

JPEGs (224-256 px crops of scikit-image's photos) are written to a temporary folder. Each loader
setting runs for --seconds after a warm-up batch; the ns step (clean + noisy views as one 2B batch,
CE + CE, AdamW) runs --steps times. RSS figures come from separate processes, each streaming the
same number of batches from its folder. Writes bench/results/<device kind>/loader.{json,md} (or under --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import POSITIVE, Parser, add_runtime_args, count, machine_line, ns_step, out_dir, sync

ROOT = Path(__file__).resolve().parent


def write_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """n JPEGs in ``classes`` folders: random 224-256 px crops of scikit-image's photos, resized."""
    from PIL import Image
    from skimage import data as skd

    photos = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket(), np.stack([skd.camera()] * 3, -1)]
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        s = int(rng.integers(160, min(img.shape[:2])))
        y0, x0 = int(rng.integers(0, img.shape[0] - s + 1)), int(rng.integers(0, img.shape[1] - s + 1))
        side = int(rng.integers(224, 257))
        Image.fromarray(img[y0:y0 + s, x0:x0 + s]).resize((side, side)).save(
            root / f"class{i % classes:03d}" / f"{i:06d}.jpg", quality=90)
    return root


def loader_rate(folder: Path, parts, workers: int, batch: int, seconds: float) -> float:
    from nsvit_fast.data.stream import StreamingData

    s = StreamingData(folder, parts, batch_size=batch, seed=0, workers=workers)
    s.next()  # warm-up: workers start, first batch
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3 * batch:  # 3 batches at least: one slow batch is not a rate
        s.next()
        n += batch
    rate = n / (time.perf_counter() - t0)
    s.close()
    return rate


def ns_step_rate(rt, batch: int, steps: int) -> tuple[float, float]:
    """(ms per ns step, images per second) for ViT-S/16 224, random init, on rt's device/precision."""
    from nsvit_fast import load_model

    parts = load_model("vit_small_patch16_224").to(rt.device)
    opt = torch.optim.AdamW(parts.parameters(), lr=0.0)
    x = torch.rand(batch, 3, 224, 224, device=rt.device)
    y = torch.randint(0, 1000, (batch,), device=rt.device)
    v = torch.randn(parts.token_shape, device=rt.device)
    parts.train()
    times = []
    with rt.matmul_mode():
        for i in range(steps + 1):
            sync(rt)
            t0 = time.perf_counter()
            ns_step(parts, opt, x, y, v, rt)
            sync(rt)
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    return ms, batch / (ms / 1e3)


FINETUNE = ["finetune", "--config", "vit_s_imagenet", "--model", "vit_tiny_patch16_224", "--quiet", "--device", "cpu",
            "--workers", "1", "num_classes=10", "rounds=1", "model_steps=2", "synth.max_steps=2", "batch_size=16",
            "synth.batch_size=16", "val_data=null", "random_init=true"]


def finetune_rss(folder: Path, out: Path) -> float:
    """Peak RSS (MB) of the issue's command: a streaming finetune + synthesis of ViT-Ti/16 on
    ``folder`` (1 round, 2 model steps, 2 synthesis steps, batch 16), measured in a wrapper process
    (the largest of its descendants: the finetune process itself; its worker is smaller)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(r.stderr[-2000:]) if r.returncode else None; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if r.returncode == 0 else -1)")
    p = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "nsvit_fast", *FINETUNE,
                        "--data", str(folder), "--out", str(out)], capture_output=True, text=True)
    mb = float(p.stdout.strip().splitlines()[-1])
    if mb < 0:
        raise SystemExit(f"the finetune on {folder} failed: {p.stderr[-1500:]}")
    return mb


def rss_child(folder: str, batches: int, batch: int) -> None:
    """In a child process: stream ``batches`` batches with 1 worker, print the peak RSS (MB) of this
    process plus its worker."""
    import resource

    from nsvit_fast import load_model
    from nsvit_fast.data.stream import StreamingData

    parts = load_model("vit_small_patch16_224")
    s = StreamingData(folder, parts, batch_size=batch, seed=0, workers=1, persistent_workers=False)
    for _ in range(batches):
        s.next()
    s.close()
    del s
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rss_mb": me + kids, "self_mb": me, "worker_mb": kids}))


def main() -> int:
    ap = Parser(doc=__doc__)
    ap.add_argument("--images", type=count(10), default=2000,
                    help="N, at least one per class (10); the RSS comparison also writes 10 N")
    ap.add_argument("--batch", type=count(1), default=64, help="loader batch")
    ap.add_argument("--seconds", type=POSITIVE, default=8.0, help="time per loader setting")
    ap.add_argument("--step-batch", type=count(0), default=0, help="ns step batch (0: 128 on CUDA, 8 on the CPU)")
    ap.add_argument("--steps", type=count(1), default=3)
    add_runtime_args(ap)
    ap.add_argument("--out", type=out_dir, default=ROOT / "results",
                    help="results root; files go to OUT/<device kind>/")
    ap.add_argument("--rss-batches", type=count(1), default=30)
    ap.add_argument("--no-rss", action="store_true", help="skip the N vs 10 N RSS comparison")
    ap.add_argument("--rss-child", nargs=3, metavar=("FOLDER", "BATCHES", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))

    from nsvit_fast import load_model
    from nsvit_fast.io import write_json, write_text
    from nsvit_fast.runtime import device_kind

    rt = ap.runtime(args.device, args.precision)
    dest = args.out / device_kind(rt.device)
    res = {"machine": machine_line(rt), "runtime": rt.describe(), "torch": torch.__version__,
           "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "images": args.images, "loader_batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        small = write_jpegs(Path(tmp) / "n", args.images)
        parts = load_model("vit_small_patch16_224")
        res["loader_images_per_s"] = {str(w): round(loader_rate(small, parts, w, args.batch, args.seconds), 1)
                                      for w in (0, 1, 2)}
        step_batch = args.step_batch or (128 if rt.device.type == "cuda" else 8)
        ms, rate = ns_step_rate(rt, step_batch, args.steps)
        res.update(ns_step_batch=step_batch, ns_step_ms=round(ms, 1), ns_step_images_per_s=round(rate, 1))
        if not args.no_rss:
            big = write_jpegs(Path(tmp) / "10n", 10 * args.images)
            rss = {}
            for name, folder in (("n", small), ("10n", big)):
                p = subprocess.run([sys.executable, __file__, "--rss-child", str(folder), str(args.rss_batches),
                                    str(args.batch)], capture_output=True, text=True, check=True)
                rss[name] = json.loads(p.stdout.strip().splitlines()[-1])
            res["loader_rss_mb"] = rss
            res["loader_rss_10n_over_n"] = round(rss["10n"]["rss_mb"] / rss["n"]["rss_mb"], 3)
            ft = {name: round(finetune_rss(folder, Path(tmp) / f"run-{name}"), 1)
                  for name, folder in (("n", small), ("10n", big))}
            res["finetune_rss_mb"] = ft
            res["rss_ratio_10n_over_n"] = round(ft["10n"] / ft["n"], 3)
            if args.images == 2000:
                res["rss_ratio_20k_over_2k"] = res["rss_ratio_10n_over_n"]
    write_json(dest / "loader.json", res)
    lr = res["loader_images_per_s"]
    md = [f"# Loader benchmark ({res['machine']}, {rt.precision}; {res['cpus']} CPUs)",
          "", "| workers | images/s delivered |", "|---|---|"]
    md += [f"| {w} | {r} |" for w, r in lr.items()]
    md += ["", f"ViT-S/16 224 ns step (batch {step_batch}, clean + noisy views): {res['ns_step_ms']} ms, "
           f"{res['ns_step_images_per_s']} images/s consumed."]
    if "rss_ratio_10n_over_n" in res:
        md += [f"Peak RSS of a streaming finetune + synthesis (ViT-Ti/16, 1 round, batch 16): "
               f"{res['finetune_rss_mb']['n']:.0f} MB ({args.images} JPEGs) vs {res['finetune_rss_mb']['10n']:.0f} MB "
               f"({10 * args.images}); ratio {res['rss_ratio_10n_over_n']}."]
    if "loader_rss_10n_over_n" in res:
        md += [f"Peak RSS streaming {args.rss_batches} batches: {res['loader_rss_mb']['n']['rss_mb']:.0f} MB "
               f"({args.images} images) vs {res['loader_rss_mb']['10n']['rss_mb']:.0f} MB ({10 * args.images}); "
               f"ratio {res['loader_rss_10n_over_n']}."]
    write_text(dest / "loader.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-round set-up of a streamed finetuning run's noise synthesis, the old way and the new, side by side.

    .venv/bin/python bench/bench_round_setup.py [--files 20000] [--sample 256] [--repeats 3]

Each round of a streamed run (an ImageFolder tree, the paper's ImageNet layout) learns its noise on
its own seeded stream, and from round 1 on measures the last noise's drift on a training sample.
Until session 39 a round built a new ``StreamingData`` (a listing of the whole folder) and read the
sample from disk again; now it takes ``StreamingData.reseeded`` of the training stream (the same
file list) and the sample is read once per run. This times both ways, alternated within each
repeat: the listing on a folder of ``--files`` files (hard links to one small JPEG, 100 classes),
and ``sample(--sample)`` of 500 x 375 JPEGs through ``vit_small_patch32_224``'s eval transform. The
listing is scaled to ImageNet-1k's 1,281,167 training files. Writes
bench/results/<device kind>/round_setup.{json,md} (or under --out).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from common import Parser, count, cpu_line, out_dir, write_results

ROOT = Path(__file__).resolve().parent
IMAGENET_TRAIN_FILES = 1_281_167


def many_files(root: Path, n: int, classes: int = 100) -> Path:
    """n JPEG names in ``classes`` folders, hard links to one 32 px JPEG (a listing reads names, not pixels)."""
    from PIL import Image
    from skimage import data as skd

    first = None
    for i in range(n):
        d = root / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        if first is None:
            first = d / f"{i}.JPEG"
            Image.fromarray(skd.astronaut()[:32, :32]).save(first, quality=90)
        else:
            os.link(first, d / f"{i}.JPEG")
    return root


def photos(root: Path, n: int, classes: int = 4) -> Path:
    """n 500 x 375 JPEGs (scikit-image's photos resized, ImageNet's typical size) in ``classes`` folders."""
    from PIL import Image
    from skimage import data as skd

    src = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(src[i % len(src)]).resize((500, 375)).save(d / f"{i}.JPEG", quality=90)
    return root


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = Parser(doc=__doc__)
    ap.add_argument("--files", type=count(100), default=20000, help="files in the listed folder (>= 100)")
    ap.add_argument("--sample", type=count(1), default=256, help="images in the drift sample (synth.heldout)")
    ap.add_argument("--repeats", type=count(1), default=3)
    ap.add_argument("--out", type=out_dir, default=ROOT / "results",
                    help="results root; files go to OUT/cpu/")
    args = ap.parse_args()

    import torch

    from nsvit_fast import load_model
    from nsvit_fast.data.stream import StreamingData

    torch.manual_seed(0)
    rows = {"listing_old": [], "listing_new": [], "sample_old": [], "sample_new": []}
    with tempfile.TemporaryDirectory() as tmp:
        listed = many_files(Path(tmp) / "many", args.files)
        pics = photos(Path(tmp) / "photos", args.sample)
        wide = load_model("vit_small_patch32_224", num_classes=100)
        four = load_model("vit_small_patch32_224", num_classes=4)
        train = StreamingData(listed, wide, 128, 0)
        held = StreamingData(pics, four, 128, 0)
        held.sample(args.sample)  # the run's first read, paid once either way
        for r in range(args.repeats):  # old and new alternated within each repeat
            rows["listing_old"].append(timed(lambda: StreamingData(listed, wide, 128, r + 1)))
            rows["listing_new"].append(timed(lambda: train.reseeded(128, r + 1)))
            rows["sample_old"].append(timed(lambda: StreamingData(pics, four, 128, r + 1).sample(args.sample)))
            rows["sample_new"].append(timed(lambda: held.reseeded(128, r + 1).sample(args.sample)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    scale = IMAGENET_TRAIN_FILES / args.files
    res = {"machine": f"{cpu_line()}, torch {torch.__version__}", "files": args.files, "sample": args.sample,
           "repeats": args.repeats, "seconds": {k: [round(x, 6) for x in v] for k, v in rows.items()},
           "median_seconds": {k: round(v, 6) for k, v in med.items()},
           "imagenet_listing_seconds_per_round_old": round(med["listing_old"] * scale, 2),
           "per_round_seconds_saved_imagenet": round(med["listing_old"] * scale + med["sample_old"]
                                                     - med["listing_new"] - med["sample_new"], 2)}
    md = "\n".join([
        f"# Per-round set-up of a streamed run's synthesis ({res['machine']})", "",
        f"Median of {args.repeats} repeats, old and new alternated within each.", "",
        "| step | old: per round | new: per round |", "|---|---|---|",
        f"| listing {args.files} files | {med['listing_old']:.4f} s | {med['listing_new'] * 1e3:.3f} ms |",
        f"| drift sample, {args.sample} JPEGs 500 x 375 | {med['sample_old']:.3f} s | {med['sample_new'] * 1e3:.3f} ms |",
        "",
        f"Scaled to ImageNet-1k's {IMAGENET_TRAIN_FILES:,} files, the old listing took "
        f"{res['imagenet_listing_seconds_per_round_old']} s per round and rank; with the sample, "
        f"{res['per_round_seconds_saved_imagenet']} s per round and rank are saved. The run's first "
        "listing and first sample read are paid either way.", ""])
    write_results(args.out / "cpu", "round_setup", res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

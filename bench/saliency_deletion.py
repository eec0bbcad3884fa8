"""Deletion check of the saliency maps on the embedded model: blank the most (least) relevant
patch of each digits test image and measure how much probability the predicted class loses.
A faithful map gives a large drop for its top patch and none for its bottom patch.

    .venv/bin/python bench/saliency_deletion.py

Writes bench/results/saliency.json and .md (or to --out). CPU timings.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from nsvit_fast import digits, load_model
from nsvit_fast.analysis.saliency import METHODS, saliency
from nsvit_fast.io import write_json, write_text

from common import Parser, cpu_line, out_dir

RESULTS = Path(__file__).resolve().parent / "results"


def blank(parts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    r = parts.img_size[0] // parts.grid_size[0]
    xx = x.clone()
    for i, k in enumerate(idx.tolist()):
        gy, gx = divmod(k, parts.grid_size[1])
        xx[i, :, gy * r:(gy + 1) * r, gx * r:(gx + 1) * r] = 0
    return xx


def main() -> None:
    ap = Parser(doc=__doc__)
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="folder for saliency.json / .md")
    args = ap.parse_args()
    torch.manual_seed(0)
    parts = load_model("digits_vit")
    x = digits("test").images
    with torch.no_grad():
        p0 = parts(x).softmax(-1)
    cls = p0.argmax(-1)
    base = p0.gather(1, cls[:, None])

    def drop(xx):
        with torch.no_grad():
            return float((base - parts(xx).softmax(-1).gather(1, cls[:, None])).mean())

    rows = []
    rand = torch.randint(parts.num_patches, (len(x),))
    rows.append({"method": "random patch", "drop_top": drop(blank(parts, x, rand)), "drop_bottom": None, "ms_per_image": None})
    for m in METHODS:
        saliency(parts, x[:8], m, target=cls[:8])  # untimed: the first call's set-up (hooks, autograd) is not per image
        t0 = time.perf_counter()
        s = saliency(parts, x, m, target=cls).flatten(1)
        ms = (time.perf_counter() - t0) / len(x) * 1e3
        rows.append({"method": m, "drop_top": drop(blank(parts, x, s.argmax(1))),
                     "drop_bottom": drop(blank(parts, x, s.argmin(1))), "ms_per_image": ms})
    res = {"model": "digits_vit", "images": len(x), "machine": f"{cpu_line()}, {torch.get_num_threads()} threads",
           "rows": rows}
    write_json(args.out / "saliency.json", res)
    md = [f"Deletion check, digits_vit, {len(x)} test images, {res['machine']}: mean loss of the predicted "
          "class's probability when one 8x8 patch is blanked.", "",
          "| map | top patch blanked | bottom patch blanked | ms per image |", "|---|---|---|---|"]
    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    md += [f"| {r['method']} | {f(r['drop_top'])} | {f(r['drop_bottom'])} | {f(r['ms_per_image'], 2)} |" for r in rows]
    write_text(args.out / "saliency.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

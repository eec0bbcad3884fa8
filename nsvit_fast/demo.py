"""The main job on the embedded default: at this stage, the exact nullspace of the digits ViT.

Loads the committed digits model, prints its nullspace table, adds exact nullspace noise of norm
``scale`` x each image's norm to test images, shows the predictions are unchanged and by how
little the logits move, and writes the paper's Fig. 2 as a PNG with a short markdown report.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .data import digits
from .io import write_json, write_text
from .models import load_model
from .nullspace import nullspace_basis, verify_invariance
from .pretrain import accuracy
from .viz import nullspace_noise_figure


def run_demo(out_dir: str | Path = "runs/demo", scale: float = 10.0, num_images: int = 397,
             seed: int = 0, log=print) -> dict:
    t0 = time.perf_counter()
    out = Path(out_dir)
    parts = load_model("digits_vit")
    test = digits("test").subset(num_images)
    acc = accuracy(parts, test.images, test.labels)
    basis = nullspace_basis(parts)
    row = basis.summary("digits_vit")
    log(f"model digits_vit: test accuracy {acc:.4f} on {len(test)} digits test images")
    log(_table([row]))

    g = torch.Generator().manual_seed(seed)
    unit = basis.sample(len(test), norm=1.0, generator=g, dtype=torch.float64)
    noise64 = unit * (scale * test.images.double().flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    noise = noise64.float()
    inv32 = verify_invariance(parts, test.images, noise)
    parts64 = load_model("digits_vit").double()
    inv64 = verify_invariance(parts64, test.images.double(), noise64)
    log(f"noise norm {scale:g}x each image's norm (min ratio {inv32['noise_to_image_norm']:.1f}):")
    for tag, inv in (("float32", inv32), ("float64", inv64)):
        log(f"  {tag}: predictions unchanged {inv['predictions_match']:.2%}, max relative change "
            f"patch embedding {inv['patch_embed_rel']:.2e}, logits {inv['logits_rel']:.2e}")

    with torch.no_grad():
        k = 4
        pc = parts(test.images[:k]).softmax(-1)
        pn = parts(test.images[:k] + noise[:k]).softmax(-1)
    fig = nullspace_noise_figure(test.images[:k], noise[:k], pc, pn, out / "fig2_nullspace_noise.png")
    result = {"model": "digits_vit", "test_accuracy": acc, "nullspace": row, "noise_scale": scale,
              "invariance_float32": inv32, "invariance_float64": inv64, "figure": str(fig),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "demo.json", result)
    write_text(out / "report.md", _report(result))
    log(f"wrote {fig}, {out / 'report.md'} ({result['seconds']} s)")
    return result


def _table(rows: list[dict]) -> str:
    head = f"{'model':28s} {'patch':>5s} {'input dim':>9s} {'embed dim':>9s} {'rank':>5s} {'nullspace':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:28s} {str(r['patch_size']):>5s} {r['input_dim']:>9d} {r['embed_dim']:>9d} "
                     f"{r['rank']:>5d} {r['nullspace_dim']:>9d}")
    return "\n".join(lines)


def _report(r: dict) -> str:
    n = r["nullspace"]
    i32, i64 = r["invariance_float32"], r["invariance_float64"]
    return f"""# nsvit-fast demo report

Model `digits_vit` (embedded, committed checkpoint): test accuracy **{r['test_accuracy']:.4f}**.

## Exact patch-embedding nullspace

| patch | input dim C·r² | embed dim D | rank | nullspace dim |
|---|---|---|---|---|
| {n['patch_size']} | {n['input_dim']} | {n['embed_dim']} | {n['rank']} | {n['nullspace_dim']} |

## Invariance to nullspace noise ({r['noise_scale']:g}× each image's norm)

| precision | predictions unchanged | max rel. change, patch embedding | max rel. change, logits |
|---|---|---|---|
| float32 | {i32['predictions_match']:.2%} | {i32['patch_embed_rel']:.2e} | {i32['logits_rel']:.2e} |
| float64 | {i64['predictions_match']:.2%} | {i64['patch_embed_rel']:.2e} | {i64['logits_rel']:.2e} |

![nullspace noise](fig2_nullspace_noise.png)
"""

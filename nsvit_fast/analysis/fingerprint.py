"""Model fingerprints from the exact patch-embedding nullspace (the paper's "patenting" idea, made
testable).

make: K challenge images x_i (from the owner's data) and noises v_i in the owner's pixel-space
nullspace, scaled to ``scale`` x each image's norm, plus control noises r_i of the same norms in
random directions. The owner's outputs on x_i + v_i equal those on x_i.

verify: a suspect's score is  mean_i ||f(x_i + v_i) - f(x_i)|| / mean_i ||f(x_i + r_i) - f(x_i)||
(logits). The owner scores 0 (to float round-off); a model derived from it (finetuned, pruned,
quantised) keeps a patch embedding close to the owner's, so v_i stays nearly invisible and the
score stays small; for an unrelated model v_i is just noise and the score is near 1. The decision
is score < threshold (default 0.25, chosen from the ROC in bench/fingerprint_roc.py).

Limits, plainly: a suspect who retrains or re-initialises the patch embedding re-randomises its
nullspace and escapes; a model without a nullspace (embed dim >= C r r, e.g. ViT-B/16) cannot be
fingerprinted this way; the suspect must take the owner's input size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NsvitError, check_pixels
from ..eval.accuracy import eval_mode
from ..io import load_tensors, save_tensors
from ..nullspace import nullspace_basis

THRESHOLD = 0.25


@dataclass
class Fingerprint:
    images: torch.Tensor
    noise: torch.Tensor
    control: torch.Tensor
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, {"images": self.images, "noise": self.noise, "control": self.control},
                            {"kind": "nsvit-fast/fingerprint", **self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "Fingerprint":
        t, m = load_tensors(path)
        if m.get("kind") != "nsvit-fast/fingerprint":
            raise NsvitError(f"{path} is not a fingerprint made by nsvit-fast")
        return cls(t["images"], t["noise"], t["control"], m)


def make_fingerprint(parts, images: torch.Tensor, n: int = 64, scale: float = 2.0, seed: int = 0) -> Fingerprint:
    check_pixels("images", images)
    basis = nullspace_basis(parts)
    if basis.dim == 0:
        raise NsvitError(f"{parts.name} has no patch-embedding nullspace (embed dim {basis.embed_dim} >= "
                         f"C*r*r = {basis.input_dim}): this fingerprint needs one")
    if scale <= 0:
        raise NsvitError(f"scale must be > 0, got {scale}")
    g = torch.Generator().manual_seed(seed)
    x = images[torch.randperm(images.shape[0], generator=g)[:n]].float()
    norms = scale * x.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    v = basis.sample(x.shape[0], norm=1.0, img_size=tuple(x.shape[-2:]), generator=g, dtype=torch.float64)
    r = torch.randn(x.shape, generator=g, dtype=torch.float64)
    r = r / r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    from ..models import weights_fingerprint

    meta = {"owner": parts.name, "arch": parts.arch, "owner_weights": weights_fingerprint(parts), "n": int(x.shape[0]),
            "scale": scale, "seed": seed, "nullspace_dim": basis.dim, "threshold": THRESHOLD,
            "input_size": list(x.shape[1:])}
    return Fingerprint(x, (v * norms).float(), (r * norms).float(), meta)


@torch.no_grad()
def score(parts, fp: Fingerprint, batch_size: int = 256) -> dict:
    if tuple(fp.images.shape[1:]) != (parts.in_chans, *parts.img_size):
        raise NsvitError(f"the suspect takes images {(parts.in_chans, *parts.img_size)}, the fingerprint holds "
                         f"{tuple(fp.images.shape[1:])}")
    dev = next(parts.parameters()).device
    dn = dr = agree = 0.0
    with eval_mode(parts):
        for i in range(0, fp.images.shape[0], batch_size):
            x = fp.images[i:i + batch_size].to(dev)
            z = parts(x)
            zn = parts(x + fp.noise[i:i + batch_size].to(dev))
            zr = parts(x + fp.control[i:i + batch_size].to(dev))
            dn += float((zn - z).norm(dim=1).sum())
            dr += float((zr - z).norm(dim=1).sum())
            agree += float((zn.argmax(-1) == z.argmax(-1)).float().sum())
    n = fp.images.shape[0]
    return {"score": dn / max(dr, 1e-30), "nullspace_change": dn / n, "control_change": dr / n,
            "prediction_agreement": agree / n}


def verify(parts, fp: Fingerprint, threshold: float | None = None) -> dict:
    t = float(fp.meta.get("threshold", THRESHOLD) if threshold is None else threshold)
    s = score(parts, fp)
    return {**s, "threshold": t, "verified": s["score"] < t}


# -- populations: derived copies for testing a fingerprint, and the ROC over scored models --
def pruned_copy(parts, frac: float):
    """A copy with the smallest-magnitude fraction ``frac`` of each Linear/Conv weight set to 0."""
    p = copy.deepcopy(parts)
    with torch.no_grad():
        for m in p.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                k = int(frac * m.weight.numel())
                if k:
                    thr = m.weight.abs().flatten().kthvalue(k).values
                    m.weight[m.weight.abs() <= thr] = 0
    return p


def quantised_copy(parts, bits: int = 8):
    """A copy with every parameter tensor rounded to a symmetric ``bits``-bit grid (per tensor)."""
    p = copy.deepcopy(parts)
    with torch.no_grad():
        for prm in p.parameters():
            s = prm.abs().max() / (2 ** (bits - 1) - 1)
            if s > 0:
                prm.copy_((prm / s).round() * s)
    return p


def population_roc(rows: list[dict], threshold: float = THRESHOLD) -> dict:
    """ROC of the decision over scored models.

    rows: dicts with "group" ("derived" = positives, "unrelated" = negatives; any other group, e.g.
    "evasion", is reported but left out of the ROC) and "score". Returns AUC, the ROC curve, and the
    true/false positive rates at ``threshold``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    pos = [r["score"] for r in rows if r["group"] == "derived"]
    neg = [r["score"] for r in rows if r["group"] == "unrelated"]
    if not pos or not neg:
        raise NsvitError("an ROC needs at least one derived and one unrelated model")
    y = [1] * len(pos) + [0] * len(neg)
    s = [-v for v in pos + neg]          # lower score = more likely derived
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "threshold": threshold,
            "true_positive_rate": sum(v < threshold for v in pos) / len(pos),
            "false_positive_rate": sum(v < threshold for v in neg) / len(neg),
            "roc_fpr": fpr.tolist(), "roc_tpr": tpr.tolist()}


def roc_figure(rows: list[dict], roc: dict, path: str | Path, title: str = "") -> Path:
    """Two panels: each model's score by group with the threshold (log scale), and the ROC curve."""
    from ..io import save_figure
    from ..viz import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.28 * len(rows) + 1.6), gridspec_kw={"width_ratios": [2, 1]})
    colours = {"derived": "tab:blue", "unrelated": "tab:red"}
    for i, r in enumerate(rows):
        a.scatter(max(r["score"], 1e-6), i, color=colours.get(r["group"], "tab:gray"), zorder=3)
    a.set_yticks(range(len(rows)), [f"{r['group']}: {r['model']}" for r in rows], fontsize=7)
    a.invert_yaxis()
    a.set_xscale("log")
    a.axvline(roc["threshold"], color="k", ls="--", lw=1, label=f"threshold {roc['threshold']}")
    a.set_xlabel("score (0 = owner, ~1 = unrelated; floored at 1e-6)")
    a.legend(fontsize=7)
    b.plot(roc["roc_fpr"], roc["roc_tpr"], marker="o")
    b.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
    b.set_xlabel("false positive rate")
    b.set_ylabel("true positive rate")
    b.set_title(f"ROC, AUC {roc['auc']:.3f}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out

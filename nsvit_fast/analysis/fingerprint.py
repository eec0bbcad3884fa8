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

Limits, plainly: the test sees only the patch embedding (and the input normalisation), so a model
that shares the owner's patch embedding verifies whatever its other weights are, e.g. an
independent finetune of the same public checkpoint the owner started from; a suspect who retrains
or re-initialises the patch embedding re-randomises its nullspace and escapes. Verification is
white-box: it feeds x_i + v_i, whose pixels leave [0, 1], and reads logits (clamped to [0, 1], as an
image API would, the owner itself no longer verifies). A model without a nullspace (embed dim >= C
r r, e.g. ViT-B/8; the square ViT-B/16's is numerical, 0 or 1 depending on the weights) cannot be
fingerprinted this way; the suspect must take the owner's input size.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MAX_FINGERPRINT_SCALE, NsvitError, check_count, check_finite, check_pixels, check_positive
from ..eval.accuracy import eval_mode
from ..io import load_tensors, save_tensors
from ..nullspace import nullspace_basis

THRESHOLD = 0.25
TENSORS = ("images", "noise", "control")
SIGNED = ("owner", "arch", "owner_weights", "n", "scale", "seed", "nullspace_dim", "threshold", "input_size")
NORM_RTOL = 1e-3  # float32 round-off on norms of 3k-150k-element tensors is far below this


def digest(images: torch.Tensor, noise: torch.Tensor, control: torch.Tensor, meta: dict) -> str:
    """sha256 over the challenge tensors (dtype, shape, bytes) and the parameters in SIGNED."""
    import hashlib
    import json

    h = hashlib.sha256(b"nsvit-fast/fingerprint/1\n")
    for name, t in zip(TENSORS, (images, noise, control)):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    h.update(json.dumps({k: meta.get(k) for k in SIGNED}, sort_keys=True).encode())
    return h.hexdigest()


def check_threshold(t, source: str = "threshold") -> float:
    """A decision threshold must be a finite number in (0, 1): unrelated models score about 1."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t < 1:
        raise NsvitError(f"{source} must be a finite number in (0, 1), got {t!r}")
    return float(t)


@dataclass
class Fingerprint:
    """A fingerprint: K challenges and their noises, all (K, C, H, W) float32.

    Attributes:
        images: challenge pixels in [0, 1].
        noise: per challenge, a noise in the owner's exact nullspace of norm ``scale`` x the image's.
        control: per challenge, a random-direction noise of the same norm.
        meta: owner, arch, owner_weights, n, scale, seed, nullspace_dim, threshold, input_size and
            the sha256 ``digest`` over all of it (see :func:`digest`).
    """

    images: torch.Tensor
    noise: torch.Tensor
    control: torch.Tensor
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Check (see :meth:`check`) and write the fingerprint as safetensors, atomically; returns the path."""
        self.check(str(path))
        return save_tensors(path, {"images": self.images, "noise": self.noise, "control": self.control},
                            {"kind": "nsvit-fast/fingerprint", **self.meta})

    @classmethod
    def load(cls, path: str | Path, expect_digest: str | None = None) -> "Fingerprint":
        """Read and check a fingerprint file (see :meth:`check`).

        Args:
            path: a file written by :meth:`save`.
            expect_digest: the digest the owner recorded at make time; the file must carry it.

        Raises:
            NsvitError: a missing or unreadable file, a file that is not a fingerprint, anything
                :meth:`check` refuses, or a digest other than ``expect_digest``.
        """
        t, m = load_tensors(path)
        if m.get("kind") != "nsvit-fast/fingerprint":
            raise NsvitError(f"{path} is not a fingerprint made by nsvit-fast")
        missing = [k for k in TENSORS if k not in t]
        if missing:
            raise NsvitError(f"{path}: fingerprint lacks tensor {missing[0]!r} (edited or corrupt file)")
        fp = cls(t["images"], t["noise"], t["control"], m).check(str(path))
        if expect_digest is not None and fp.meta["digest"] != str(expect_digest).strip().lower():
            raise NsvitError(f"{path} has digest {fp.meta['digest']}, not the expected "
                             f"{str(expect_digest).strip()}: it is not the fingerprint you recorded")
        return fp

    def check(self, source: str = "fingerprint") -> "Fingerprint":
        """Refuse a fingerprint that could give a wrong answer: tensors of unequal shapes, NaN/inf,
        images outside [0, 1], a zero or rescaled noise or control (each must have ``scale`` x its
        image's norm), a threshold outside (0, 1), or contents that do not match the stored digest
        (an edit of the file). A file without a digest (made before digests existed) is refused:
        make it again."""
        x, v, r, m = self.images, self.noise, self.control, self.meta
        if x.dim() != 4 or x.shape[0] < 1 or v.shape != x.shape or r.shape != x.shape:
            raise NsvitError(f"{source}: images, noise and control must share one shape (K, C, H, W), got "
                             f"{tuple(x.shape)}, {tuple(v.shape)}, {tuple(r.shape)}")
        for name, t in zip(TENSORS, (x, v, r)):
            if t.dtype != torch.float32:  # as make writes them; the model reads float32 pixels
                raise NsvitError(f"{source}: {name} must be float32, got {str(t.dtype).replace('torch.', '')}")
            check_finite(f"{source}: {name}", t)
        check_pixels(f"{source}: images", x)
        check_threshold(m.get("threshold"), f"{source}: threshold")
        scale = m.get("scale")
        if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
                or scale > MAX_FINGERPRINT_SCALE):  # past make's bound, scale x norm can overflow and pass anything
            raise NsvitError(f"{source}: scale must be a finite number in (0, {MAX_FINGERPRINT_SCALE:g}], got {scale!r}")
        # the signed record must describe these tensors: a re-signed n or input size would mislead a reader
        if m.get("n") != x.shape[0] or isinstance(m.get("n"), bool):
            raise NsvitError(f"{source}: n is {m.get('n')!r} but the file holds {x.shape[0]} challenges (edited file?)")
        if m.get("input_size") != list(x.shape[1:]):
            raise NsvitError(f"{source}: input_size is {m.get('input_size')!r} but the challenges are "
                             f"{list(x.shape[1:])} (edited file?)")
        for key in ("owner", "arch"):
            if not isinstance(m.get(key), str) or not m.get(key):
                raise NsvitError(f"{source}: {key} must be a model name, got {m.get(key)!r} (edited file?)")
        seed = m.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise NsvitError(f"{source}: seed must be an integer >= 0, got {seed!r} (edited file?)")
        want = scale * x.double().flatten(1).norm(dim=1)
        for name, t in (("noise", v), ("control", r)):
            got = t.double().flatten(1).norm(dim=1)
            bad = ~((got - want).abs() <= NORM_RTOL * want)
            if bool(bad.any()) or bool((got == 0).any()):
                i = int(bad.nonzero()[0]) if bool(bad.any()) else int((got == 0).nonzero()[0])
                raise NsvitError(f"{source}: {name} {i} has norm {float(got[i]):.4g}, not scale x image norm "
                                 f"= {float(want[i]):.4g} (zeroed or rescaled: edited file?)")
        if "digest" not in m:
            raise NsvitError(f"{source} has no integrity digest (made by an older nsvit-fast); make it again "
                             f"with: nsvit-fast fingerprint make")
        if m["digest"] != digest(x, v, r, m):
            raise NsvitError(f"{source}: contents do not match the stored digest (the file was edited); "
                             f"refused")
        return self


def make_fingerprint(parts, images: torch.Tensor, n: int = 64, scale: float = 2.0, seed: int = 0) -> Fingerprint:
    """A fingerprint of ``parts`` (see the module docstring).

    Args:
        parts: the owner's adapter.
        images: (N, C, H, W) pixels in [0, 1] at the model's input size; n of them, drawn with
            ``seed``, become the challenges (all of them if N < n).
        n: challenges, >= 1 (at most the images given; more is a warning and one challenge per image).
        scale: noise norm / image norm, > 0.
        seed: challenge draw and noise directions.

    Returns:
        a :class:`Fingerprint` with K = min(n, N) challenges and its digest in ``meta``.

    Raises:
        NsvitError: images outside [0, 1], n < 1, scale <= 0, an all-black challenge, or a model
            without a patch-embedding nullspace.
    """
    from ..models import adapt
    from ..errors import check_seed

    parts = adapt(parts)
    check_pixels("images", images)
    parts.check_images(images)  # a fingerprint at another size would fail only at verify
    n = check_count("n", n, 1)
    check_positive("scale", scale)
    if scale > MAX_FINGERPRINT_SCALE:  # the owner's own score drifts up with float32 round-off, NaN at 1e30
        raise NsvitError(f"scale must be at most {MAX_FINGERPRINT_SCALE:g} (noise norm / image norm), got {scale:g}")
    seed = check_seed("seed", seed)
    basis = nullspace_basis(parts)
    if basis.dim == 0:
        raise NsvitError(f"{parts.name} has no patch-embedding nullspace (embed dim {basis.embed_dim} >= "
                         f"C*r*r = {basis.input_dim}): this fingerprint needs one")
    if n > images.shape[0]:  # fewer challenges than asked, silently (the threshold was set at 128)
        import warnings

        warnings.warn(f"fingerprint: n={n} challenges asked for, but there are {images.shape[0]} images: "
                      f"{images.shape[0]} challenges made", stacklevel=2)
    g = torch.Generator().manual_seed(seed)
    x = images[torch.randperm(images.shape[0], generator=g)[:n]].float()
    norms = scale * x.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    if not bool((norms > 0).all()):
        raise NsvitError("a challenge image is all black (norm 0): its noise would be 0; give other images")
    v = basis.sample(x.shape[0], norm=1.0, img_size=tuple(x.shape[-2:]), generator=g, dtype=torch.float64)
    r = torch.randn(x.shape, generator=g, dtype=torch.float64)
    r = r / r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    from ..models import weights_fingerprint

    meta = {"owner": parts.name, "arch": parts.arch, "owner_weights": weights_fingerprint(parts), "n": int(x.shape[0]),
            "scale": float(scale), "seed": seed, "nullspace_dim": basis.dim, "threshold": THRESHOLD,
            "input_size": list(x.shape[1:])}
    noise, control = (v * norms).float(), (r * norms).float()
    meta["digest"] = digest(x, noise, control, meta)
    return Fingerprint(x, noise, control, meta)


@torch.no_grad()
def score(parts, fp: Fingerprint, batch_size: int = 256) -> dict:
    if tuple(fp.images.shape[1:]) != (parts.in_chans, *parts.img_size):
        raise NsvitError(f"the suspect takes images {(parts.in_chans, *parts.img_size)}, the fingerprint holds "
                         f"{tuple(fp.images.shape[1:])}")
    dev = next(parts.parameters()).device
    dn = dr = agree = size = 0.0
    with eval_mode(parts):
        for i in range(0, fp.images.shape[0], batch_size):
            x = fp.images[i:i + batch_size].to(dev)
            z = parts(x)
            zn = parts(x + fp.noise[i:i + batch_size].to(dev))
            zr = parts(x + fp.control[i:i + batch_size].to(dev))
            dn += float((zn - z).norm(dim=1).sum())
            dr += float((zr - z).norm(dim=1).sum())
            agree += float((zn.argmax(-1) == z.argmax(-1)).float().sum())
            size += float(z.norm(dim=1).sum())
    n = fp.images.shape[0]
    return {"score": dn / max(dr, 1e-30), "nullspace_change": dn / n, "control_change": dr / n,
            "prediction_agreement": agree / n, "logit_norm": size / n}


def verify(parts, fp: Fingerprint, threshold: float | None = None) -> dict:
    """Score a suspect against a fingerprint.

    Args:
        parts: the suspect's adapter (it must take the fingerprint's input size).
        fp: the fingerprint, checked first (see :meth:`Fingerprint.check`).
        threshold: in (0, 1); None: the fingerprint's own, with a warning when it is not the
            built-in one (``make`` stores that, so another value was written by hand).

    Returns:
        {"score": mean nullspace change / mean control change of the logits (0 for the owner, ~1 for
        an unrelated model), "nullspace_change", "control_change" (mean logit L2 per challenge),
        "prediction_agreement" (share of challenges whose prediction the nullspace noise keeps),
        "threshold", "verified": score < threshold}.

    Raises:
        NsvitError: a fingerprint :meth:`Fingerprint.check` refuses, a threshold outside (0, 1), or a
            suspect of another input size.
    """
    from ..models import adapt

    if not isinstance(fp, Fingerprint):
        raise NsvitError(f"fp must be a Fingerprint (Fingerprint.load(path)), got {type(fp).__name__}")
    parts = adapt(parts)
    fp.check()
    t = check_threshold(fp.meta["threshold"] if threshold is None else threshold)
    if threshold is None and t != THRESHOLD:  # make always stores the built-in one; the digest is no seal
        import warnings

        warnings.warn(f"the fingerprint's own threshold is {t:g}, not the built-in {THRESHOLD:g}: the file was "
                      f"edited (its digest can be recomputed) or made by another version; give the threshold "
                      f"you trust (--threshold), and keep the digest apart (--expect-digest)", stacklevel=2)
    s = score(parts, fp)
    if not all(math.isfinite(s[k]) for k in ("score", "control_change", "logit_norm")):
        raise NsvitError(f"{parts.name}: the fingerprint's challenges give non-finite logits (score {s['score']}): "
                         f"it cannot be scored")
    # a model whose output ignores its input moves under neither noise: 0 / 0 scored 0, "verified"
    if s["control_change"] <= 1e-6 * s["logit_norm"] or s["control_change"] == 0:
        small = f" or the fingerprint's scale {fp.meta['scale']:g} is too small to move float32 pixels" \
            if fp.meta["scale"] < 1e-3 else ""
        raise NsvitError(f"{parts.name}: its output does not respond to its input{small} (the control noise moves "
                         f"the logits by {s['control_change']:.2g}): it cannot be scored")
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

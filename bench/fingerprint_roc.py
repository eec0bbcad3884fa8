"""Fingerprint ROC over a population of digits models: derived from the owner (finetuned, NS-
finetuned, pruned, quantised) against unrelated ones (other seeds, another architecture), plus the
evasion the docs warn about (patch embedding re-initialised and retrained).

    .venv/bin/python bench/fingerprint_roc.py

Writes bench/results/fingerprint.json, .md (scores, AUC, the threshold's error rates) and .png (or to --out).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from nsvit_fast import digits, load_model
from nsvit_fast.analysis.fingerprint import (THRESHOLD, make_fingerprint, population_roc, pruned_copy,
                                             quantised_copy, roc_figure, score)
from nsvit_fast.io import write_json, write_text
from nsvit_fast.models import embedded
from nsvit_fast.pretrain import PretrainConfig, pretrain_digits
from nsvit_fast.train import finetune

from common import Parser, out_dir

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = Parser(doc=__doc__)
    ap.add_argument("--out", type=out_dir, default=RESULTS, help="folder for fingerprint.json / .md / .png")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    train = digits("train")
    owner = load_model("digits_vit")
    fp = make_fingerprint(owner, digits("val").images, n=128)
    synth = {"lim": 3.0, "max_steps": 300}
    derived, unrelated = {}, {}
    derived["owner"] = owner
    for name, kw in (("plain 1x40 lr1e-4", dict(method="plain", rounds=1, lr=1e-4)),
                     ("plain 5x40 lr3e-4", dict(method="plain", rounds=5, lr=3e-4)),
                     ("ns 3x40 lr1e-4", dict(method="ns", rounds=3, lr=1e-4, noise_init="fresh", synth=synth))):
        m = load_model("digits_vit")
        finetune(m, train, model_steps=40, progress=False, device="cpu", **kw)
        derived[name] = m
    derived["pruned 20%"], derived["pruned 50%"] = pruned_copy(owner, 0.2), pruned_copy(owner, 0.5)
    derived["int8"], derived["int6"] = quantised_copy(owner, 8), quantised_copy(owner, 6)
    derived["fp16"] = copy.deepcopy(owner).half().float()
    for seed in (1, 2, 3):
        unrelated[f"seed {seed}"] = pretrain_digits(PretrainConfig(epochs=20, seed=seed), progress=False)[0]
    other = load_model(embedded.ARCH, **{**embedded.KWARGS, "embed_dim": 64, "depth": 4, "num_heads": 2})
    other.model.pretrained_cfg = {**other.model.pretrained_cfg, "mean": embedded.MEAN, "std": embedded.STD}
    from nsvit_fast.models import adapt

    other = adapt(other.model, embedded.MEAN, embedded.STD, "digits dim64")
    finetune(other, train, method="plain", rounds=15, model_steps=40, lr=2e-3, progress=False, device="cpu")
    unrelated["dim 64, depth 4"] = other
    evade = load_model("digits_vit")
    with torch.no_grad():
        torch.nn.init.trunc_normal_(evade.model.patch_embed.proj.weight, std=0.02)
    finetune(evade, train, method="plain", rounds=5, model_steps=40, lr=1e-3, progress=False, device="cpu")
    rows = []
    for group, models in (("derived", derived), ("unrelated", unrelated), ("evasion", {"patch embed retrained": evade})):
        for name, m in models.items():
            s = score(m, fp)
            rows.append({"group": group, "model": name, **{k: round(v, 5) for k, v in s.items()},
                         "verified": s["score"] < THRESHOLD})
            print(rows[-1], flush=True)
    roc = population_roc(rows)
    auc, tpr, fpr = roc["auc"], roc["true_positive_rate"], roc["false_positive_rate"]
    res = {**roc, "rows": rows}
    roc_figure(rows, roc, args.out / "fingerprint.png",
               title="Fingerprint of digits_vit: scores of derived, unrelated and evading models (CPU run)")
    write_json(args.out / "fingerprint.json", res)
    md = [f"Fingerprint of digits_vit (128 challenges, scale 2): AUC {auc:.3f} (derived vs unrelated); "
          f"at threshold {THRESHOLD}: {tpr:.0%} of derived models verified, {fpr:.0%} of unrelated ones.", "",
          "| group | model | score | prediction agreement | verified |", "|---|---|---|---|---|"]
    md += [f"| {r['group']} | {r['model']} | {r['score']:.4f} | {r['prediction_agreement']:.3f} | {r['verified']} |"
           for r in rows]
    write_text(args.out / "fingerprint.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""The ``nsvit-fast`` command: a thin layer over the Python API, one subcommand per verb.

A user's mistake (NsvitError) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import NsvitError


def _model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", default=default, help="timm ViT name, or digits_vit (the embedded model)"
                   + (f"; default {default}" if default else ""))
    p.add_argument("--checkpoint", help="local weights: .safetensors or a torch file (read weights-only)")
    p.add_argument("--num-classes", type=int, help="head size (default: the checkpoint's)")
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights (network)")


def _load(args):
    from .models import load_model

    if args.model is None and args.checkpoint is None:
        raise NsvitError("give --model NAME (or --checkpoint FILE saved by nsvit-fast)")
    return load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                      pretrained=args.pretrained)


# -- nullspace --
def cmd_nullspace(args) -> int:
    from .demo import _table
    from .nullspace import TABLE1, nullspace_basis, nullspace_table

    if args.table1:
        rows = nullspace_table([name for name, _ in TABLE1], rtol=args.rtol)
        for row, (_, paper) in zip(rows, TABLE1):
            row["paper"] = paper
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(_table(rows))
            print("paper (Table 1): " + ", ".join(f"{r['model']}={r['paper']}" for r in rows))
            print("Randomly initialised weights (seed 0) are full rank up to round-off: C*r*r - D where positive. "
                  "vit_base_patch16_224 is square (768 = 768): its nullspace is numerical, 0 or 1 for a random "
                  "draw under the default tolerance; the paper's 2 came from pretrained weights.")
        return 0
    parts = _load(args)
    row = nullspace_basis(parts, rtol=args.rtol).summary(args.model or parts.arch)
    print(json.dumps(row) if args.json else _table([row]))
    return 0


def add_nullspace(sub) -> None:
    p = sub.add_parser("nullspace", help="exact patch-embedding nullspace of a model (paper Table 1)",
                       description="Rank and nullspace dimension of the flattened patch projection "
                                   "(SVD in float64; rank = singular values > sigma_max * rtol).")
    _model_args(p)
    p.add_argument("--rtol", type=float, help="rank tolerance relative to sigma_max "
                                              "(default max(D, C*r*r) * float32 eps)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table1", action="store_true", help="the paper's Table 1: eight timm ViTs, randomly initialised")
    p.set_defaults(func=cmd_nullspace)


# -- pretrain --
def cmd_pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain_digits

    cfg = PretrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    _, m = pretrain_digits(cfg, out=args.out, progress=not args.quiet)
    print(f"digits_vit: val accuracy {m['val_acc']:.4f}, test accuracy {m['test_acc']:.4f}, "
          f"{m['train_seconds']} s on {m['threads']} threads -> {args.out}")
    return 0


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train the embedded digits ViT from scratch",
                       description="Train digits_vit (img 32, patch 8, dim 96, depth 6) on scikit-learn's digits.")
    p.add_argument("--out", default="digits_vit.safetensors", help="output checkpoint (.safetensors)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)


# -- demo --
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, scale=args.scale, seed=args.seed)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded digits model",
                       description="Nullspace table, invariance to exact nullspace noise, Fig. 2 PNG, report.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--scale", type=float, default=10.0, help="noise norm / image norm (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


COMMANDS = [add_nullspace, add_pretrain, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsvit-fast", description="Robust ViTs by approximate nullspace augmented finetuning "
        "(Liu et al., CPAL 2025). Images are pixels in [0, 1]; models are timm ViTs or digits_vit.")
    parser.add_argument("--version", action="version", version=f"nsvit-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NsvitError as e:
        print(f"nsvit-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nsvit-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

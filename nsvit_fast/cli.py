"""The ``nsvit-fast`` command: a thin layer over the Python API, one subcommand per verb.

A user's mistake prints one line on stderr, ``nsvit-fast: error: ...``, and exits with code 2:
NsvitError from the API, a bad argument (argparse's error, made one line), and a filesystem error
(read-only folder, full disk, a file where a folder is expected). Python warnings raised while a
command runs are held back and printed after it succeeds, one line each, so an error line is
always the only line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import re
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import MAX_COUNT, MAX_FINGERPRINT_SCALE, MAX_NOISE_SCALE, MAX_SEED, MAX_WORKERS, NsvitError, env_int


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``nsvit-fast: error: ...`` and exit 2, no usage block."""

    def error(self, message: str):
        first = (message.strip().splitlines() or ["bad arguments"])[0]
        self.exit(2, f"nsvit-fast: error: {first} (see {self.prog} --help)\n")


# -- argument types: a bad value is argparse's one-line error, before anything runs --
def count(lo: int = 1, hi: int | None = None):
    """A whole number >= lo and <= hi (default :data:`~nsvit_fast.errors.MAX_COUNT`: 1e20 steps would
    overflow torch's int64 deep in a run)."""
    from .errors import MAX_COUNT

    hi = MAX_COUNT if hi is None else hi
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text!r}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text!r}")
        return v
    parse.__name__ = f"whole number >= {lo}"
    return parse


def sha256_hex(text: str) -> str:
    """A sha256 digest as 64 hex digits (case and surrounding spaces ignored); an empty value is an
    error, not "no check" (an unset shell variable must not switch the check off)."""
    t = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", t):
        raise argparse.ArgumentTypeError(f"must be the 64-hex-digit sha256 digest that make printed, got {text!r}")
    return t


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = True, hi_open: bool = False):
    """A finite float in the interval (lo, hi] by default."""
    rng = f"{'(' if lo_open else '['}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}" \
          f"{')' if hi_open or hi is None else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {rng}, got {text!r}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and (v >= hi if hi_open else v > hi)):
            raise argparse.ArgumentTypeError(f"must be a finite number in {rng}, got {text!r}")
        return v
    parse.__name__ = f"number in {rng}"
    return parse


def listof(item, what: str):
    """Comma-separated values, each parsed by ``item``; at least one, none twice (a repeated seed,
    lambda or variant ran twice and was counted as two)."""
    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if not text.strip() or any(not t for t in parts):
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")
        out = []
        for t in parts:
            try:
                v = item(t)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{t!r} in {text!r}: {e}") from None
            if v in out:
                raise argparse.ArgumentTypeError(f"{t!r} appears twice in {text!r}")
            out.append(v)
        return out
    parse.__name__ = f"comma-separated {what}"
    return parse


def one_of(names, what: str):
    """One of ``names`` (an engine's constant), for comma-separated lists of them."""
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r} ({what}s: {', '.join(names)})")
        return text
    parse.__name__ = what
    return parse


def suite_folder(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"must be SUITE=PATH (e.g. imagenet-r=/data/imagenet-r), got {text!r}")
    return name.strip(), path


POSITIVE = number(0)
EPS = number(0, 2, hi_open=True)  # MSE-prob is at most 2: an eps of 2 or more passes every noise
SEED = count(0, MAX_SEED)


def _model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    # the default applies without --checkpoint only: a checkpoint saved by nsvit-fast names its own model
    # (a default of digits_vit refused every other model's file, and built a vit_tiny's as "digits_vit")
    p.add_argument("--model", help="timm ViT name, or digits_vit (the embedded model)"
                   + (f"; default {default}, or the model --checkpoint records" if default else ""))
    p.set_defaults(model_default=default)
    p.add_argument("--checkpoint", help="local weights: .safetensors or a torch file (read weights-only)")
    p.add_argument("--num-classes", type=count(1), help="head size (default: the checkpoint's)")
    p.add_argument("--img-size", dest="img_size", type=count(1),
                   help="input size of a timm model built at another size than its name's (as timm's --img-size; "
                        "a checkpoint saved by nsvit-fast records its own)")
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights (network)")
    p.add_argument("--use-ema", dest="use_ema", action="store_true",
                   help="--checkpoint's EMA weights (state_dict_ema, as timm's --use-ema; not eval's --compare files)")
    _norm_args(p, "")


def _norm_value(text: str) -> float:
    """A --mean / --std number. They take 1 or C numbers, so a key=value or a subcommand right after
    them is read as one: say so."""
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r} (--mean and --std read every word after "
                                         f"them: put other arguments before them)") from None
    return number()(text)


def _norm_args(p: argparse.ArgumentParser, key_note: str) -> None:
    for flag, what in (("mean", "mean pixel value"), ("std", "pixel std")):
        p.add_argument(f"--{flag}", type=_norm_value, nargs="+", metavar=flag.upper(),
                       help=f"the {what} per channel (1 or C numbers) the weights were trained with, when not "
                            f"the model's timm config's (as timm's --{flag}; a checkpoint saved by nsvit-fast "
                            f"records its own; eval's --compare files keep theirs){key_note}")


def _check_default_data(args, parts) -> None:
    """--data left at its digits default for a model of another input size: say so, rather than
    "takes images (B, 3, 224, 224), got (16, 3, 32, 32)"."""
    if "data" in getattr(args, "given", ()) or not str(getattr(args, "data", "")).startswith("digits"):
        return
    if tuple(parts.img_size) != (32, 32):
        raise NsvitError(f"--data defaults to {args.data} (32 x 32 images), which {parts.name} cannot take "
                         f"({parts.img_size[0]} x {parts.img_size[1]}): give --data FOLDER")


def _random_weights(args) -> bool:
    """A timm architecture with neither --checkpoint nor --pretrained: randomly initialised."""
    from .models import embedded

    return (args.checkpoint is None and not getattr(args, "pretrained", False) and args.model is not None
            and args.model != embedded.NAME)


def _load(args, random_ok: bool = False):
    """The model the flags name. ``random_ok``: random weights serve the command (the nullspace's
    rank); elsewhere they are warned about (finetune refuses them)."""
    from .models import load_model

    _default_model(args)
    import torch

    if _random_weights(args) and not random_ok:  # scored, synthesised on or fingerprinted as if trained
        warnings.warn(f"{args.model} has random weights (seed 0): no --checkpoint and no --pretrained, so its "
                      f"results are a random model's")
    torch.manual_seed(0)  # a model without weights given is randomly initialised: reproducibly
    return load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                      pretrained=args.pretrained, use_ema=args.use_ema, mean=args.mean, std=args.std, **_size(args))


def _default_model(args) -> None:
    """--model falls back to the command's default only without --checkpoint (a file names its model)."""
    if args.model is None and args.checkpoint is None:
        args.model = getattr(args, "model_default", None)
        if args.model is None:
            raise NsvitError("give --model NAME (or --checkpoint FILE saved by nsvit-fast)")


def _weights_read(args) -> dict:
    """The weights file the command will read, for check_distinct: --checkpoint, else the built-in
    model's own file (synth --out onto it replaced the model with a bank)."""
    if args.checkpoint is not None:
        return {"--checkpoint": args.checkpoint}
    from .models import embedded

    if (args.model or getattr(args, "model_default", None)) == embedded.NAME:
        return {f"the built-in {embedded.NAME} weights": embedded.CHECKPOINT}
    return {}


def _needs_config(what: str) -> NsvitError:
    return NsvitError(f"finetune {what} takes a --config: the default one, digits, holds the embedded digits "
                      f"model's settings; give --config vit_s_imagenet (the paper's ViT-S settings), vit_b_imagenet, "
                      f"or a YAML of yours")


def _image_folder(data, split: str | None = None, default: str = "train") -> Path | None:
    """The folder ``--data`` reads (a split folder when --split names one); None for a named set or
    a spec that does not parse (the command's own reading of it says why)."""
    from .data import parse_spec

    if data is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the command's own parse warns, once
            spec = parse_spec(data, split, default_split=default)
    except NsvitError:
        return None
    return Path(spec.root) if spec.kind == "folder" else None


def _size(args) -> dict:
    return {"img_size": args.img_size} if getattr(args, "img_size", None) else {}


# -- nullspace --
def cmd_nullspace(args) -> int:
    from .demo import format_nullspace_rows as _table
    from .io import dumps
    from .nullspace import TABLE1, nullspace_basis, nullspace_table

    if args.table1:
        given = [f for f, v in (("--model", args.model), ("--checkpoint", args.checkpoint),
                                ("--num-classes", args.num_classes), ("--img-size", args.img_size),
                                ("--pretrained", args.pretrained), ("--mean", args.mean), ("--std", args.std),
                                ("--use-ema", args.use_ema)) if v]
        if given:  # the table is the paper's eight randomly initialised models; a model flag would be ignored
            raise NsvitError(f"--table1 takes no {given[0]}: it measures the paper's eight timm ViTs, randomly "
                             f"initialised (drop --table1 to measure one model)")
        # depth=1: the blocks do not touch the patch embedding (same seeded weights), and a full ViT-L costs ~6 s
        rows = nullspace_table([name for name, _ in TABLE1], rtol=args.rtol, depth=1)
        for row, (_, paper) in zip(rows, TABLE1):
            row["paper"] = paper
        if args.json:
            print(dumps(rows, indent=2))
        else:
            print(_table(rows))
            print("paper (Table 1): " + ", ".join(f"{r['model']}={r['paper']}" for r in rows))
            print("Randomly initialised weights (seed 0) are full rank up to round-off: C*r*r - D where positive. "
                  "vit_base_patch16_224 is square (768 = 768): its nullspace is numerical, 0 or 1 for a random "
                  "draw under the default tolerance; our unverified guess is that the paper's 2 came from "
                  "pretrained weights.")
        return 0
    parts = _load(args, random_ok=True)  # the rank of a random draw is Table 1's reading
    # a checkpoint is named by its path, as in eval's rows: its arch name would hide its own patch size
    label = args.model or (str(args.checkpoint) if args.checkpoint else parts.arch)
    row = nullspace_basis(parts, rtol=args.rtol).summary(label)
    print(dumps(row) if args.json else _table([row]))
    return 0


def add_nullspace(sub) -> None:
    p = sub.add_parser("nullspace", help="exact patch-embedding nullspace of a model (paper Table 1)",
                       description="Rank and nullspace dimension of the flattened patch projection "
                                   "(SVD in float64; rank = singular values > sigma_max * rtol).")
    _model_args(p)
    p.add_argument("--rtol", type=number(0, 1, lo_open=False, hi_open=True),
                   help="rank tolerance relative to sigma_max, in [0, 1) (default max(D, C*r*r) * float32 eps)")
    p.add_argument("--json", action="store_true", help="print JSON: one object, or with --table1 a list of them")
    p.add_argument("--table1", action="store_true", help="the paper's Table 1: eight timm ViTs, randomly initialised")
    p.set_defaults(func=cmd_nullspace)


# -- pretrain --
def cmd_pretrain(args) -> int:
    from .io import check_output_file
    from .pretrain import PretrainConfig, pretrain_digits
    from .runlock import output_lock

    check_output_file(args.out, (".safetensors",))
    cfg = PretrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    with output_lock({"--out": args.out}):  # two trainings writing one file: the second is refused
        _, m = pretrain_digits(cfg, out=args.out, progress=not args.quiet)
    print(f"digits_vit: val accuracy {m['val_acc']:.4f}, test accuracy {m['test_acc']:.4f}, "
          f"{m['train_seconds']} s on {m['threads']} thread{'s' if m['threads'] != 1 else ''} -> {args.out}")
    return 0


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train the embedded digits ViT from scratch",
                       description="Train digits_vit (img 32, patch 8, dim 96, depth 6) on scikit-learn's digits.")
    p.add_argument("--out", default="digits_vit.safetensors", help="output checkpoint (.safetensors; default digits_vit.safetensors)")
    p.add_argument("--epochs", type=count(1), default=60,
                   help="passes over the 1200 training digits (default 60; the lr warms up over the first 3, "
                        "so with fewer it never reaches --lr)")
    p.add_argument("--lr", type=POSITIVE, default=2e-3, help="AdamW learning rate (default 0.002)")
    p.add_argument("--batch-size", type=count(1), default=64, help="images per step (default 64)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the weights and the batch order (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown on a terminal only)")
    p.set_defaults(func=cmd_pretrain)


# -- demo --
def cmd_demo(args) -> int:
    from .demo import run_demo
    from .io import check_output_dir

    check_output_dir(args.out)
    run_demo(args.out, scale=args.scale, seed=args.seed, quick=args.quick)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded digits model",
                       description="Exact nullspace (Fig. 2), ns / plain / random finetuning on one budget, "
                                   "robustness evaluation, a markdown report with figures.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--scale", type=number(0, MAX_NOISE_SCALE), default=10.0,
                   help=f"noise norm / image norm (default 10, at most {MAX_NOISE_SCALE:g})")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the noises, the finetuning and the attacks (default 0)")
    p.add_argument("--quick", action="store_true", help="a 2-round finetuning budget (for a fast check)")
    p.set_defaults(func=cmd_demo)


# -- synth --
def _data_args(p: argparse.ArgumentParser, default: str = "digits", split: str = "train") -> None:
    """--data (one spec, parsed by nsvit_fast.data.parse_spec), --split, --max-images, --on-bad-image."""
    from .data import BAD_IMAGE, SPLIT_FOLDERS

    p.add_argument("--data", default=default, help=f"digits[:split], synthetic[:split], or an ImageFolder path "
                                                   f"(default {default})")
    p.add_argument("--split", help=f"split of digits / synthetic (default {split}), or the split folder "
                                   f"({', '.join(SPLIT_FOLDERS)}) of a --data folder that holds them")
    p.add_argument("--max-images", type=count(1), help="use at most this many images (>= 1; default all)")
    p.add_argument("--on-bad-image", choices=BAD_IMAGE, default="error",
                   help="an unreadable image in a folder: stop naming it (default), or skip it and count it")


def _synth_args(p: argparse.ArgumentParser, omit: tuple[str, ...] = ()) -> None:
    """The synthesis flags, less ``omit`` (dests): a command that fixes a setting does not take its flag."""
    from .synth import SynthConfig
    from .synth.engine import LR_SCHEDULES, MODES, SCHEDULES, STOPS

    d = SynthConfig()
    g = p.add_argument_group("synthesis (defaults: the paper's)")

    def add(flag, **kw):
        if kw.get("dest", flag[2:].replace("-", "_")) not in omit:
            g.add_argument(flag, **kw)

    add("--eps", type=EPS, default=d.eps, help=f"ε: MSE of probabilities (default {d.eps})")
    add("--lim", type=POSITIVE, default=d.lim, help=f"init U(-lim, lim) (default {d.lim})")
    add("--lr", type=POSITIVE, default=d.lr, help=f"noise learning rate (default {d.lr})")
    add("--max-steps", type=count(1), default=d.max_steps, help=f"default {d.max_steps}")
    add("--batch-size", type=count(1), default=d.batch_size, help=f"default {d.batch_size}")
    add("--num-noises", type=count(1), default=d.num_noises, help="noises learned at once (default 1)")
    add("--mode", choices=MODES, default=d.mode, help="default fast")
    add("--schedule", choices=SCHEDULES, default=d.schedule, help="default paper")
    add("--stop", choices=STOPS, default=None, help=f"default {d.stop} (the paper's); --schedule boundary stops "
                                                     f"on held-out images")
    add("--heldout", type=count(0), default=d.heldout, help=f"held-out images: carved out of the data for "
        f"--stop heldout; a metrics sample left in training for --stop batch (default {d.heldout})")
    steps = "--steps" if "max_steps" in omit else "--max-steps"  # profile runs a fixed --steps
    add("--lr-schedule", dest="lr_schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
        help=f"cosine over 10 x {steps} as the official code (default), or over {steps}")
    add("--lr-t-max", dest="lr_t_max", type=count(0), default=d.lr_t_max,
        help=f"official schedule's T_max (default 0: 10 x {steps}; 30030 is the official ImageNet run)")
    add("--seed", type=SEED, default=d.seed, help=f"seed of the noise init and the batches (default {d.seed})")


def _synth_overrides(args) -> dict:
    keys = ("eps", "lim", "lr", "max_steps", "batch_size", "num_noises", "mode", "schedule", "stop", "heldout", "seed",
            "lr_schedule", "lr_t_max")
    if getattr(args, "stop", None) == "batch" and getattr(args, "schedule", None) == "boundary":
        raise NsvitError("--stop batch: --schedule boundary stops its descent on held-out images; leave --stop out")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_synth(args) -> int:
    from .data import stream_or_load
    from .io import check_distinct, check_output_file, dumps, staged_writes
    from .runlock import output_lock
    from .runtime import Runtime
    from .synth import synthesize

    from .data import parse_spec

    streamed = parse_spec(args.data, args.split).kind == "folder" and args.max_images is None
    stray = next((f for f in ("augment", "workers") if getattr(args, f) is not None), None)
    if stray and not streamed:  # ignored without a word: the bank was the one made without it
        raise NsvitError(f"--{stray} applies to a streamed folder (--data FOLDER without --max-images); this data "
                         f"is read into memory and used as it is")
    if streamed and args.mode == "reference":  # the API's words ("without cache=") meant nothing here
        raise NsvitError("--mode reference runs the official loop over images in memory: add --max-images N to "
                         "read N images of the folder, or use --mode fast to stream it")
    check_output_file(args.out, (".safetensors",))
    if args.log:
        check_output_file(args.log, what="--log")
    check_distinct({"--out": args.out, "--log": args.log}, _weights_read(args),
                   {"--data": _image_folder(args.data, args.split)}, files=("--out", "--log"))
    with output_lock({"--out": args.out, "--log": args.log}):  # a second synth on these files: refused
        rt = Runtime.create(args.device, args.precision or "fp32")
        parts = _load(args).to(rt.device)
        _check_default_data(args, parts)
        data = stream_or_load(args.data, parts, args.split, args.max_images, args.on_bad_image,
                              progress=not args.quiet)
        if isinstance(data, Path):  # a folder, streamed with the official augmentation
            from .data.stream import StreamingData

            data = StreamingData(data, parts, args.batch_size, args.seed, args.augment or "rrc_flip",
                                 4 if args.workers is None else args.workers, device=rt.device,
                                 on_bad_image=args.on_bad_image)
        with staged_writes():  # the log is renamed with the bank, or removed: a failed save left it behind
            bank = synthesize(parts, data, progress=not args.quiet, log=args.log, runtime=rt, **_synth_overrides(args))
            bank.save(args.out)
    if args.json:
        print(dumps(bank.summary()))
    else:
        # stop=batch measures the stop on a sample of the training images, not held-out ones
        col = "held-out MSE-prob" if bank.meta.get("heldout_source") != "train_sample" else "MSE-prob (train)"
        print(f"{'noise':>5s} {'steps':>6s} {'conv':>5s} {'norm':>9s} {col:>18s} {'match':>6s}")
        for i in range(len(bank)):
            print(f"{i:5d} {int(bank.steps[i]):6d} {str(bool(bank.converged[i])):>5s} {float(bank.norm[i]):9.2f} "
                  f"{float(bank.mse_prob[i]):18.4f} {float(bank.match_rate[i]):6.3f}")
        print(f"eps {bank.meta['eps']}, {bank.meta['mode']}/{bank.meta['schedule']}, stop {bank.meta['descent_stop']}, "
              f"lr {bank.meta['descent_lr']:g}, {bank.meta['seconds']} s -> {args.out}")
    return 0


def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="learn ε-approximate nullspace noise (a NoiseBank)",
                       description="Learn noise at the patch tokens that moves output probabilities by < ε "
                                   "(paper Eq. 7-8, Alg. 1 lines 3-14) and save it as a NoiseBank (safetensors).")
    _model_args(p, default="digits_vit")
    _data_args(p)
    _synth_args(p)
    p.add_argument("--out", default="noise_bank.safetensors", help="output bank (default noise_bank.safetensors)")
    p.add_argument("--log", help="JSONL file, one record per stop check: step, active (count), noise (their "
                                 "indices), mse_prob and norm (each noise's, as tested at that step)")
    p.add_argument("--json", action="store_true", help="print the bank's summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_args(p)
    from .data.stream import AUGMENTS

    p.add_argument("--augment", choices=AUGMENTS,
                   help="a streamed folder (no --max-images): rrc_flip (RandomResizedCrop + flip, timm's, the model's "
                        "interpolation; default), official (torchvision's bilinear, as the official scripts) or none")
    p.add_argument("--workers", type=count(0, MAX_WORKERS),
                   help="DataLoader workers for a streamed folder (default 4)")
    p.set_defaults(func=cmd_synth)


# -- profile --
def cmd_profile(args) -> int:
    from .data import load_data, parse_spec
    from .io import check_distinct, check_output_file
    from .runlock import output_lock
    from .synth import profile_synth

    if args.trace:
        check_output_file(args.trace, (".json",), what="--trace")
        check_distinct({"--trace": args.trace}, _weights_read(args),
                       {"--data": _image_folder(args.data, args.split)}, files=("--trace",))
    parts = _load(args)
    _check_default_data(args, parts)
    kw = _synth_overrides(args)
    cap = args.max_images
    if cap is None and parse_spec(args.data, args.split).kind == "folder":  # a folder is read whole: an
        cap = args.steps * kw["batch_size"]  # ImageNet train folder for 20 steps took hours, then memory
    data = load_data(args.data, args.split, parts, cap, args.on_bad_image)
    with output_lock({"--trace": args.trace}):
        res = profile_synth(parts, data, steps=args.steps, trace=args.trace, **kw)
    batch = min(kw["batch_size"], len(data))  # the batch a step takes (BatchStream: all images if fewer)
    fills = ", first-epoch cache fills included" if kw["mode"] == "fast" else ""  # reference caches nothing
    m = kw.get("num_noises", 1)  # reference mode steps its noises one after another: a step is all of theirs
    each = "" if m == 1 else (f" of all {m} noises, " + ("batched" if kw["mode"] == "fast" else "one after another"))
    print(f"{args.steps} synthesis steps, mode {kw['mode']}, batch {batch}: {res['wall_ms']:.0f} ms "
          f"({res['ms_per_step']:.1f} ms/step{each}{fills})")
    print(f"{'phase':16s} {'ms':>10s} {'share':>7s}")
    for ph, v in res["phases"].items():
        print(f"{ph:16s} {v['ms']:10.1f} {v['pct']:6.1f}%")
    if args.trace:
        print(f"Chrome trace -> {args.trace}")
    return 0


PROFILED = {"synth": cmd_profile}
PROFILE_FIXED = ("eps", "max_steps", "stop", "heldout", "schedule")  # profile_synth sets or never uses these  # what `profile` can profile: each one's command


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="profile noise synthesis by phase (torch.profiler)",
                       description="Run a few synthesis steps under torch.profiler; print time per phase and "
                                   "write a Chrome trace. A --data folder is read only as far as the steps take "
                                   "(--steps x --batch-size images) unless --max-images is given.")
    p.add_argument("what", choices=PROFILED, help="what to profile")
    _model_args(p, default="digits_vit")
    _data_args(p)
    _synth_args(p, omit=PROFILE_FIXED)  # a fixed-step profile: these would be ignored
    p.add_argument("--steps", type=count(1), default=20, help="steps to profile (default 20)")
    p.add_argument("--trace", default="synth_trace.json", help="Chrome trace output (default synth_trace.json)")
    p.set_defaults(func=lambda args: PROFILED[args.what](args))


def _eval_classes(args, main) -> list[str] | None:
    """--classes, checked before any data is read: one distinct name per output of the model."""
    if not args.classes:
        return None
    given = [c.strip() for c in args.classes.split(",")]
    if any(not c for c in given) or len(set(given)) != len(given) or len(given) != main.num_classes:
        raise NsvitError(f"--classes gives {len(given)} names ({len(set(c for c in given if c))} distinct, non-empty) "
                         f"for {main.name}'s {main.num_classes} outputs: give one name per output, in output order")
    _name_outputs(main, given, args.checkpoint)
    return given


def _name_outputs(parts, classes: list[str] | None, source) -> None:
    """The model's outputs take --classes' names (folders are then read by them), unless its file
    records others."""
    if classes is None:
        return
    own = getattr(parts, "class_names", None)
    if own is not None and list(own) != classes:
        raise NsvitError(f"--classes differs from the class names {source} records ({', '.join(own[:4])}"
                         f"{', ...' if len(own) > 4 else ''}); drop --classes, the file's are used")
    from .data.folders import known_class_names

    known = known_class_names(parts)  # digits_vit's digits, ImageNet's synsets: fixed by the model
    # the same names in another order read every label wrong; other names (an OOD folder's) are the user's
    if own is None and known is not None and list(known) != classes and set(known) == set(classes):
        raise NsvitError(f"--classes puts {parts.name}'s own class names ({', '.join(known[:4])}, ...) in "
                         f"another order; its outputs are in that order: drop --classes")
    parts.class_names = list(classes)


# -- finetune --
def cmd_finetune(args) -> int:
    from .distributed import init_from_env, peer_lost, rank_world
    from .train import finetune
    from .train.yamlcfg import load_run, parse_overrides

    from .runtime import resolve_device

    device = resolve_device(args.device)
    distributed = init_from_env(device)
    try:
        overrides = parse_overrides(args.overrides)
        import os

        def same(key, a, b) -> bool:  # paths as paths: --out ~/x (expanded by the shell) is out=~/x
            if key in ("checkpoint", "data", "val_data", "out") and a is not None and b is not None:
                return os.path.abspath(os.path.expanduser(str(a))) == os.path.abspath(os.path.expanduser(str(b)))
            if key in ("mean", "std") and isinstance(a, list) and isinstance(b, list):  # mean=[0,0,0] is --mean 0 0 0
                with contextlib.suppress(TypeError, ValueError):
                    return [float(x) for x in a] == [float(x) for x in b]
            return str(a) == str(b)

        for key in ("precision", "workers", "model", "checkpoint", "data", "val_data", "out", "num_classes",
                    "img_size", "pretrained", "use_ema", "mean", "std"):
            flag = getattr(args, key, None)  # precision=bf16 --precision fp32 ran fp32 without a word
            if flag is not None and key in overrides and not same(key, overrides[key], flag):
                raise NsvitError(f"{key} is given twice, as --{key.replace('_', '-')} {flag} and {key}="
                                 f"{overrides[key]}; give one")
        for flag in ("precision", "workers"):
            if getattr(args, flag) is not None:
                overrides[flag] = getattr(args, flag)
        if args.compile and overrides.get("compile", True) is not True:  # compile=false --compile had compiled
            raise NsvitError(f"compile is given twice, as --compile and compile={str(overrides['compile']).lower()}; "
                             f"give one")
        if args.compile:
            overrides["compile"] = True
        config = args.config or "digits"
        run, cfg = load_run(config, overrides)  # the user's own values are checked, dry run or not
        if args.dry_run:  # a minute's check of a config on the user's own data: every stage once
            # a warm noise_init (the _fast configs) differs from fresh only from round 1 on: run it too
            overrides.update({"rounds": 1 if cfg.noise_init == "fresh" else 2, "model_steps": 2,
                              "synth.max_steps": 3, "val_images": 64, "checkpoint_every": 0})
            run, cfg = load_run(config, overrides)
        for key in ("model", "checkpoint", "use_ema", "pretrained", "num_classes", "img_size", "mean", "std", "data",
                    "val_data", "out"):
            if getattr(args, key, None) is not None:
                run[key] = getattr(args, key)
        if run["data"] is None:  # `data: ~` or data=null: YAML's null, not a path
            raise NsvitError("data is null: give the training data (--data, or data: in the config), e.g. "
                             "digits:train or a folder")
        from .io import check_output_dir
        from .models import load_model
        from .train.engine import STATE_FILE

        from .models import embedded

        if args.config is None and args.checkpoint is not None and args.model is None and "model" not in overrides:
            run["model"] = None  # the file names its model; the digits config's digits_vit called any model so
        if run["model"] is None and run["checkpoint"] is None:
            raise NsvitError("the config names no model: give --model or a config with 'model:'")

        if args.config is None and run["model"] not in (None, embedded.NAME):  # lr, lim, rounds of a 32-px model
            raise _needs_config(f"--model {run['model']}")
        if run["random_init"] and (run["checkpoint"] is not None or run["pretrained"]
                                   or run["model"] in (None, embedded.NAME)):  # it had been ignored: weights were used
            given = ("checkpoint=" + str(run["checkpoint"]) if run["checkpoint"] is not None else
                     "pretrained=true" if run["pretrained"] else f"{embedded.NAME}, which ships its weights")
            raise NsvitError(f"random_init=true starts from random weights, but weights are given ({given}): drop "
                             f"one")
        if (run["model"] not in (None, embedded.NAME) and run["checkpoint"] is None and not run["pretrained"]
                and not run["random_init"]):  # the paper finetunes a pretrained model
            raise NsvitError(f"{run['model']} would start from random weights: give checkpoint= (or --checkpoint) a "
                             f"file of yours, pretrained=true (downloads timm's weights), or random_init=true to "
                             f"finetune a random model on purpose")
        from .runlock import RUN_FIGURE, RUN_FILES

        # a folder at one of the run's file names failed after round 0 (the figure) or with another message
        out = check_output_dir(run["out"] or f"runs/{'dry-run' if args.dry_run else 'finetune'}-{cfg.method}",
                               files=(*RUN_FILES, RUN_FIGURE))
        from .io import check_distinct

        check_distinct({"--out": out}, {}, {"--data": _image_folder(run["data"]),
                                            "--val-data": _image_folder(run["val_data"], default="val")})
        if args.dry_run and not args.resume and (out / STATE_FILE).is_file():  # --resume is no answer here
            raise NsvitError(f"{out} holds an earlier run (a dry run writes one too): remove it (rm -r {out}) or "
                             f"give another --out")
        if args.resume and not (out / STATE_FILE).is_file():
            raise NsvitError(f"nothing to resume: {out} holds no {STATE_FILE} (run without --resume to start a "
                             f"fresh run there)")
        import torch

        torch.manual_seed(cfg.seed)  # random_init: the same command starts from the same weights
        parts = load_model(run["model"], checkpoint=run["checkpoint"], num_classes=run["num_classes"],
                           pretrained=bool(run["pretrained"]), use_ema=bool(run["use_ema"]), mean=run["mean"],
                           std=run["std"], **({"img_size": run["img_size"]} if run["img_size"] else {}))
        if run["model"] is None:  # named by its file: the digits model is still digits_vit, anything else needs a config
            body = lambda kw: {k: v for k, v in kw.items() if k != "num_classes"}  # noqa: E731 (the head may differ)
            if parts.arch == embedded.ARCH and body(parts.model_kwargs) == body(embedded.KWARGS):
                parts.name = embedded.NAME
            elif args.config is None:
                raise _needs_config(f"of {run['checkpoint']} ({parts.arch})")
        # a folder without max_images streams (nothing holds it whole); digits, synthetic and a
        # folder cut to max_images are read into memory, the fast path for small data
        from .data import stream_or_load

        from .data.folders import adopt_class_names

        train = stream_or_load(run["data"], parts, None, run["max_images"], run["on_bad_image"],
                               progress=not args.quiet)
        adopt_class_names(parts, train)  # before the val folder is read: by the training classes' names
        try:
            val = stream_or_load(run["val_data"], parts, None, run["max_images"], run["on_bad_image"],
                                 default_split="val", progress=not args.quiet)
        except NsvitError as e:  # the config's /path/to/imagenet/val placeholder read as "data ... is neither"
            where = "" if args.val_data is not None else " (the config's val_data: give --val-data, or val_data=null)"
            raise NsvitError(f"val_data: {e}{where}") from None
        cols = ("round", "noise_norm", "mse_prob", "synth_steps", "converged", "train_loss", "val_acc", "round_seconds")
        shown: list[int] = []

        def cell(v) -> str:
            if isinstance(v, bool):  # the noise passed the stop rule (on its batch) within max_steps
                return f"{'yes' if v else 'NO':>12s}"
            return f"{v:>12.4g}" if isinstance(v, (int, float)) else f"{'-':>12s}"

        def show(history: list[dict]) -> None:  # each round's row as it ends (a long run is not silent)
            if not shown:
                if history[0].get("val_acc_start") is not None:
                    print(f"val accuracy of the starting model: {history[0]['val_acc_start']:.4g}")
                print(" ".join(f"{c:>12s}" for c in cols))
            for h in history[len(shown):]:
                print(" ".join(cell(h.get(c)) for c in cols), flush=True)
                shown.append(h["round"])

        try:
            # the warnings of the set-up (labels read by position, a val set that is the training set)
            # matter before hours of training, not after: printed once the run has started
            res = finetune(parts, train, cfg, val_data=val, out_dir=out, resume=args.resume,
                           progress=not args.quiet, device=device, on_bad_image=run["on_bad_image"], on_round=show,
                           on_start=args.release_warnings)
        except (KeyboardInterrupt, Terminated):
            if rank_world()[0] == 0 and (out / "checkpoint.safetensors").is_file():
                print(f"stopped: {out} holds the run's checkpoint; the same command with --resume goes on", flush=True)
            raise
        if rank_world()[0] == 0:
            if res.history:
                show(res.history)
            print(f"{cfg.method}: {len(res.history)} rounds -> {out}/model.safetensors, log.jsonl, fig4_trend.png")
    except RuntimeError as e:  # another rank stopped (its own line says why): this one's traceback would bury it
        if distributed and peer_lost(e):
            import re

            why = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0]).split(". ")[0][:200]
            raise NsvitError(f"rank {rank_world()[0]}: another rank left the run, so this one stops too (that "
                             f"rank's own output says why): {why}") from None
        raise
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def add_runtime_args(p, precision: bool = True) -> None:
    """--device and --precision, as synth, finetune and eval take them."""
    from .runtime import DEVICES, PRECISIONS

    p.add_argument("--device", default="auto",
                   help=f"{' | '.join(DEVICES)} (default auto: CUDA when available; under torchrun this rank's GPU)")
    if precision:
        p.add_argument("--precision", default=None, choices=PRECISIONS,
                       help="autocast of the model: fp32 (default), tf32, bf16 (CPU and GPU), fp16 (GPU, with a "
                            "GradScaler); the noise, its optimiser state and the exact-nullspace work stay fp32")


def add_finetune(sub) -> None:
    from .train.methods import DEFAULT_METHOD, METHODS

    others = ", ".join(m for m in METHODS if m != DEFAULT_METHOD)
    p = sub.add_parser("finetune", help="finetune a ViT: Algorithm 1 (ns) or a baseline",
                       description=f"Finetune with nullspace noise augmentation (the paper's Algorithm 1, method "
                                   f"{DEFAULT_METHOD}) or a baseline ({others}). Settings come from a YAML config "
                                   "(configs/*.yaml) and key=value overrides, e.g. method=plain rounds=5 "
                                   "synth.eps=0.01 (a method's own settings: METHOD.key=value). "
                                   "Under torchrun it runs data-parallel (gloo on CPU, nccl on GPU).")
    p.add_argument("--config", help="YAML file or a name in configs/ (default digits, for the embedded digits model)")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--checkpoint", help="override the config's checkpoint")
    p.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                   help="start from the checkpoint's EMA weights (config key use_ema)")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="start from timm's pretrained weights, downloaded (config key pretrained)")
    p.add_argument("--num-classes", dest="num_classes", type=count(1),
                   help="head size (config key num_classes; default: the checkpoint's)")
    p.add_argument("--img-size", dest="img_size", type=count(1),
                   help="input size of a timm model built at another size than its name's (config key img_size)")
    _norm_args(p, " (config keys mean, std)")
    p.add_argument("--data", help="training data: digits:train, synthetic, or an ImageFolder path")
    p.add_argument("--val-data", dest="val_data", help="validation data scored after each round")
    p.add_argument("--out", help="output folder (default runs/finetune-<method>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption "
                                                         "(refused if --out holds no checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder's blocks (off by default)")
    p.add_argument("--workers", type=count(0, MAX_WORKERS), default=None,
                   help="DataLoader workers for a streamed folder (config key workers, default 4)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="check the config on your data in a minute: 1 round (2 with a warm noise_init, so the "
                        "warm start runs), 2 model steps, 3 synthesis steps, 64 validation images (output in "
                        "runs/dry-run-<method> unless --out)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (synth.key for synthesis)")
    p.set_defaults(func=cmd_finetune, distributed=True)


# -- eval --
def cmd_eval(args) -> int:
    from .eval import Report
    from .io import check_distinct, check_output_dir
    from .runlock import check_not_a_run, run_lock

    check_output_dir(args.out, files=Report.FILES)
    check_distinct({"--out": args.out}, {}, {"--data": _image_folder(args.data, default="test"),
                                             **{f"--folder {k}": v for k, v in args.folder or []}})
    check_not_a_run(args.out)
    Report.check_folder(args.out)  # a user's report.md was replaced, their corruptions.png deleted
    with run_lock(args.out):  # two evaluations writing one report folder: the second is refused
        return _eval(args)


def _eval(args) -> int:
    from .eval import evaluate
    from .eval.suite import SUITES, parse_suite
    from .models import load_model
    from .runtime import Runtime

    rt = Runtime.create(args.device, args.precision or "fp32")  # before any model loads
    sep = ";" if (";" in args.suite or ":" in args.suite) else ","  # settings hold commas
    suites = [s for s in args.suite.split(sep) if s.strip()]
    if not suites:
        raise NsvitError(f"--suite {args.suite!r} names no suite (e.g. --suite clean,fgsm)")
    names = [parse_suite(s)[0] for s in suites]  # a bad setting fails here, before any model loads
    if args.bank and "noisebank" not in names:
        raise NsvitError("--bank is read by the noisebank suite only; add noisebank to --suite")
    for suite, path in args.folder or []:  # a folder no suite reads would be ignored without a word
        if suite in SUITES and SUITES[suite].needs != "folder":
            raise NsvitError(f"--folder {suite}={path}: suite {suite!r} reads no folder")
        if suite not in names:
            raise NsvitError(f"--folder {suite}={path}: no suite {suite!r} in --suite reads it; add it to --suite")
    _default_model(args)
    random_main = _random_weights(args)
    main = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, pretrained=args.pretrained,
                      use_ema=args.use_ema, mean=args.mean, std=args.std, **_size(args))
    _check_default_data(args, main)
    classes = _eval_classes(args, main)
    # by position: an empty entry is that model's default name (dropping it gave the next model's name)
    names = [n.strip() for n in (args.names or "").split(",")]
    while names and not names[-1]:
        names.pop()
    models = {}
    ckpts = [args.checkpoint] + [c for c in (args.compare or "").split(",") if c]
    if len(names) > len(ckpts):
        raise NsvitError(f"--names gives {len(names)} names for {len(ckpts)} model(s) (the model and each --compare)")
    default = f"{args.model} (random init)" if random_main else args.model
    labels = [names[i] if i < len(names) and names[i] else (default if ck is None else str(ck))
              for i, ck in enumerate(ckpts)]
    if random_main:  # named by its row, whatever --names made of it
        warnings.warn(f"{args.model} has random weights: no --checkpoint and no --pretrained, so row "
                      f"{labels[0]!r} is a random model's")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise NsvitError(f"two models would share the row name {dup[0]!r}; give distinct --names")
    for i, ck in enumerate(ckpts):
        # --use-ema is --checkpoint's (the DAT weights), so a toolkit run can be compared with it
        # --mean/--std, as --use-ema, are --checkpoint's: a --compare file records its own
        m = main if i == 0 else load_model(args.model, checkpoint=ck, num_classes=args.num_classes, **_size(args))
        _name_outputs(m, classes, ck)
        models[labels[i]] = m
    from .eval.suite import share_class_names

    share_class_names(models)  # a folder is read by the first model's rules: by names, where any has them
    from .data import load_data, parse_spec

    # a bare digits / synthetic is their test split, a folder is read as given: never a train split by default
    spec = parse_spec(args.data, None, default_split="test")
    if spec.kind == "folder":  # streams through the eval transform, batch by batch, never read whole
        from .data.folders import check_val_classes
        from .eval.source import FolderImages

        for label, m in models.items():  # a folder of none of a model's recorded classes was read by position
            check_val_classes(m, spec.root, f"--data {spec.root} (for {label})")

        data = FolderImages(spec.root, main, args.max_images, args.workers, rt.device.type == "cuda",
                            args.on_bad_image)
    else:
        data = load_data(args.data, None, main, args.max_images, args.on_bad_image, default_split="test",
                         progress=not args.quiet)
    folders = dict(args.folder) if args.folder else {}
    bank = None
    if args.bank:
        from .synth import NoiseBank

        bank = NoiseBank.load(args.bank)
    classes = classes or (getattr(data, "classes", None) if main.num_classes != 1000 else None)
    for m in models.values():
        m.to(rt.device)
    report = None
    for seed in args.seeds:
        with rt.matmul_mode(), rt.autocast():  # attacks and corruptions run the model in its precision
            r = evaluate(models, data, suites, seed=seed, baseline=args.baseline, folders=folders, bank=bank,
                         model_classes=classes, mce_reference=args.mce_reference, progress=not args.quiet,
                         max_images=args.max_images, on_bad_image=args.on_bad_image)
        report = r if report is None else report.merge(r)
    for label, ck in zip(labels, ckpts):  # each row's file, beside the weights' fingerprint
        if ck is not None and label in report.context.get("models", {}):
            report.context["models"][label]["checkpoint"] = str(ck)
    report.context["data"] = str(args.data)  # as given: a folder's path, digits:test
    paths = report.save(args.out)
    print(report.table2())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_eval(sub) -> None:
    from .eval.suite import DEFAULT_SUITES, MCE_REFERENCES, SUITES

    p = sub.add_parser("eval", help="robustness evaluation: attacks, corruptions, OOD folders (Table 2)",
                       description="Evaluate one model, or several with --compare, on the paper's suites, in pixel "
                                   f"space. Suites: {', '.join(SUITES)}. "
                                   "Change a setting with name:key=value (separate such suites with ';'), "
                                   "e.g. --suite 'clean;fgsm:eps=4/255;pgd'.")
    _model_args(p, default="digits_vit")
    p.add_argument("--compare", help="more checkpoints with the same classes and input size, comma-separated "
                                     "(each is scored on the first model's labels and images)")
    p.add_argument("--names", help="row names for the model and each --compare, comma-separated")
    from .data import BAD_IMAGE

    p.add_argument("--data", default="digits:test",
                   help="digits:test (default; a bare digits or synthetic is its test split), or an ImageFolder "
                        "path, read as given (a folder of split folders is refused: give FOLDER/val)")
    p.add_argument("--max-images", type=count(1), help="use at most this many images of --data and of each "
                                                       "--folder (>= 1; default all): a folder's spread over its "
                                                       "classes, digits' / synthetic's first ones")
    p.add_argument("--workers", type=count(0, MAX_WORKERS), default=0,
                   help="DataLoader workers decoding a --data folder (default 0)")
    p.add_argument("--on-bad-image", choices=BAD_IMAGE, default="error",
                   help="an unreadable image in a folder: stop naming it (default), or skip it and count it")
    p.add_argument("--suite", default=",".join(DEFAULT_SUITES),
                   help=f"suites (default: {','.join(DEFAULT_SUITES)}; also {', '.join(s for s in SUITES if s not in DEFAULT_SUITES)}; "
                        f"`python -c 'import nsvit_fast.eval as e; print(e.suite_help())'` lists all with settings)")
    add_runtime_args(p)
    p.add_argument("--seeds", type=listof(SEED, "seeds >= 0"), default=[0],
                   help="comma-separated seeds (mean ± std over them)")
    p.add_argument("--baseline", help="row name normalising mCE on non-ImageNet data (default: the first)")
    p.add_argument("--mce-reference", choices=MCE_REFERENCES, default="auto",
                   help="what normalises the corruptions' mCE: AlexNet's ImageNet-C errors, or the baseline "
                        "model's; auto (default) takes AlexNet for 1000-class models, else the baseline")
    p.add_argument("--folder", action="append", type=suite_folder, help="SUITE=PATH for folder suites (repeatable)")
    p.add_argument("--classes", help="the model's class names in output order, one per output; folders (--data and "
                                     "the folder suites) are then read by them (default: the names a finetuned "
                                     "model's file records, ImageNet's for 1000 classes, else the data's)")
    p.add_argument("--bank", help="NoiseBank file for the noisebank suite")
    p.add_argument("--out", default="runs/eval", help="report folder (default runs/eval)")
    p.add_argument("--quiet", action="store_true", help="no per-suite timing lines or progress bars")
    p.set_defaults(func=cmd_eval)


# -- analysis: studies, watermark, targeted noise, fingerprints --
def cmd_analyze(args) -> int:
    from .io import check_output_dir

    # each option serves some studies: one given to another study would be ignored without a word
    serves = {"run": ("trend",), "lams": ("fig3",), "steps": ("fig3",), "batch_size": ("fig3",), "m": ("fig5",),
              "pairs": ("fig5",), "eps": ("fig5",)}
    for dest in ("model", "checkpoint", "num_classes", "pretrained", "use_ema", "data", "split", "max_images",
                 "on_bad_image", "lim", "seed", "img_size", "mean", "std"):
        serves[dest] = ("fig3", "fig5")
    stray = [d for d in getattr(args, "given", ()) if args.study not in serves.get(d, (args.study,))]
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        raise NsvitError(f"analyze {args.study} takes no {flag} (it serves {' and '.join(serves[stray[0]])})")
    check_output_dir(args.out)
    from .runlock import check_not_a_run

    if args.study in ("fig3", "fig5"):
        from .io import check_distinct

        check_distinct({"--out": args.out}, {}, {"--data": _image_folder(args.data, args.split)})
        check_not_a_run(args.out)  # a finetuning run's folder is that run's
    if args.study == "trend" and args.out and args.run and Path(args.out).resolve() != Path(args.run).resolve():
        check_not_a_run(args.out)  # another run's folder: its own Fig. 4 would be replaced by this run's
    from .runlock import run_lock

    with run_lock(args.out):  # two studies on one folder: one's figure beside the other's JSON
        return _analyze(args)


def _analyze(args) -> int:
    from .analysis import studies

    if args.study == "trend":
        if not args.run:
            raise NsvitError("analyze trend needs --run DIR (a finetuning output folder)")
        res = studies.trend(args.run, args.out)
        print(f"trend over {res['rounds']} rounds -> {res['figure']}")
        return 0
    from .data import load_data

    parts = _load(args)
    data = load_data(args.data, args.split, parts, args.max_images, args.on_bad_image)
    kw = {"lim": args.lim, "seed": args.seed}
    if args.study == "fig3":
        res = studies.fig3(parts, data, args.out, lams=args.lams, steps=args.steps, batch_size=args.batch_size, **kw)
        print(f"{'lambda':>7s} {'norm':>8s} {'match':>7s} {'MSE-prob':>9s} {'perm. match':>12s} {'perm. MSE':>10s}")
        for r in res["rows"]:
            print(f"{r['lambda']:7g} {r['norm']:8.1f} {r['match_rate']:7.3f} {r['mse_prob']:9.4f} "
                  f"{r['permuted_match_rate']:12.3f} {r['permuted_mse_prob']:10.4f}")
    else:
        res = studies.fig5(parts, data, args.out, m=args.m, n_pairs=args.pairs,
                           **({} if args.eps is None else {"eps": args.eps}), **kw)
        print(f"{res['m_converged']} of {res['m_requested']} noises within eps {res['eps']} on {res['heldout_images']} held-out images "
              f"({res['synth_seconds']:.0f} s to learn); MSE-prob of alpha v:")
        print("  " + " ".join(f"{a:g}:{m:.4f}" for a, m in zip(res["alphas"][::2], res["scalar_mse_mean"][::2])))
        print(f"convex combinations on alpha1 + alpha2 = 1: max MSE-prob {res['convex_line_max']:.4f}")
    print(f"-> {res['figure']}")
    return 0


def add_analyze(sub) -> None:
    from .analysis.studies import STUDIES

    p = sub.add_parser("analyze", help="the paper's studies: fig3 (Eq. 4 sweep), fig5 (nullspace properties), trend",
                       description="fig3: Sec. 3.3 / Fig. 3 (Eq. 4 over lambda, with the permuted control); fig5: "
                                   "Sec. 5.6 / Fig. 5 (scalar multiples and convex combinations of m noises); trend: "
                                   "a Fig. 4-style trend from a finetuning run's log. Each writes a PNG and a JSON.")
    p.add_argument("study", choices=STUDIES)
    _model_args(p, default="digits_vit")
    _data_args(p)
    p.add_argument("--out", default="runs/analysis", help="output folder (default runs/analysis)")
    p.add_argument("--run", help="trend: the finetuning output folder")
    p.add_argument("--lim", type=POSITIVE, default=3.0, help="noise init U(-lim, lim) (default 3)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the noise inits and the images drawn (default 0)")
    from .synth.engine import MAX_LAM

    p.add_argument("--lams", type=listof(number(0, MAX_LAM, lo_open=False), f"lambdas in [0, {MAX_LAM:g}]"),
                   default=[0, 0.5, 1, 2, 4, 8], help="fig3: lambda values (default 0,0.5,1,2,4,8)")
    p.add_argument("--steps", type=count(1), default=300, help="fig3: optimisation steps (default 300)")
    p.add_argument("--batch-size", type=count(1), default=64, help="fig3: images per step (default 64)")
    p.add_argument("--m", type=count(2), help="fig5: noises, >= 2 (default 100 on CUDA, 24 on the CPU)")
    p.add_argument("--pairs", type=count(1), default=10, help="fig5: pairs for the convex grid (default 10)")
    p.add_argument("--eps", type=EPS, default=None,
                   help="fig5: ε (default: the paper's Sec. 5.6 value, 0.033)")
    p.set_defaults(func=cmd_analyze)


def _png_outputs(args, images: dict) -> dict:
    """watermark / targeted, before the model loads: ``--out`` is a writable .png outside a run
    folder, and it and the files beside it are none of the inputs. Returns them ({what: path})
    for the output lock."""
    from .analysis.apps import beside_files
    from .io import check_distinct, check_output_file
    from .runlock import check_not_a_run

    check_output_file(args.out, (".png",))
    js, fig = beside_files(args.out)
    outputs = {"--out": args.out, "the .json beside --out": js, "the _figure.png beside --out": fig}
    check_distinct(outputs, {**images, **_weights_read(args)})
    check_not_a_run(Path(args.out).parent, "--out's folder")  # its files and a finetuning run's side by side
    return outputs


def cmd_watermark(args) -> int:
    from .analysis import run_watermark
    from .runlock import output_lock

    outputs = _png_outputs(args, {"--image": args.image, "--mark": args.mark})
    with output_lock(outputs):  # two runs on one --out: one's image beside the other's JSON
        parts = _load(args)
        r = run_watermark(parts, args.image, args.out, mark=args.mark, strength=args.strength, iters=args.iters)
    f, q = r["float"], r["png_8bit"]
    print(f"marked -> {args.out}: PSNR to target {r['psnr_to_target']:.2f} dB (image itself "
          f"{r['psnr_target_to_image']:.2f} dB)")
    print(f"float: patch embedding change {f['patch_embed_rel']:.2e}, logits {f['logits_rel']:.2e}, predictions "
          f"kept {f['predictions_match']:.0%}; as 8-bit PNG: logits {q['logits_rel']:.2e}, kept {q['predictions_match']:.0%}")
    return 0


def add_watermark(sub) -> None:
    p = sub.add_parser("watermark", help="overlay a mark through the patch-embedding nullspace (App. E)",
                       description="Per patch, the nullspace noise that brings the image closest to "
                                   "(1 - strength) image + strength mark, pixels kept in [0, 1] (Dykstra's "
                                   "projections); the model's output does not change. "
                                   "API: nsvit_fast.analysis.run_watermark.")
    _model_args(p, default="digits_vit")
    p.add_argument("--image", required=True, help="image file, or skimage:astronaut / chelsea / coffee ...")
    p.add_argument("--mark", default="logo", help="mark image of the same size, or 'logo' (default: the built-in "
                                                  "mark; a file named logo is ./logo)")
    p.add_argument("--out", default="runs/watermark.png", help="marked image (8-bit PNG, so a .png name; default "
                                                               "runs/watermark.png); .json and _figure.png beside")
    p.add_argument("--strength", type=number(0, 1), default=0.5, help="weight of the mark in the target, in (0, 1] "
                                                                      "(default 0.5)")
    p.add_argument("--iters", type=count(1), default=100, help="Dykstra iterations for the [0, 1] box (default 100)")
    p.set_defaults(func=cmd_watermark)


def cmd_targeted(args) -> int:
    from .analysis import run_targeted
    from .runlock import output_lock

    outputs = _png_outputs(args, {"--source": args.source, "--target": args.target})
    with output_lock(outputs):  # two runs on one --out: one's image beside the other's JSON
        parts = _load(args)
        r = run_targeted(parts, args.source, args.target, args.out, iters=args.iters, maps=args.saliency)
    print(f"result -> {args.out}: L2 to target {r['l2_result_to_target']:.2f} (source was "
          f"{r['l2_source_to_target']:.2f}), PSNR to target {r['psnr_result_to_target']:.2f} dB")
    print(f"logits vs source: max relative change {r['logits_rel_to_source']:.2e}, predictions kept "
          f"{r['predictions_match_source']:.0%}")
    return 0


def add_targeted(sub) -> None:
    from .analysis.saliency import METHODS

    p = sub.add_parser("targeted", help="an image that looks like B but is A to the model (App. F)",
                       description="Targeted nullspace noise: source + v with v in the patch-embedding nullspace, "
                                   "as close to the target as the nullspace allows; the model's logits stay the "
                                   "source's. Writes the result, a JSON and a figure with saliency maps. "
                                   "API: nsvit_fast.analysis.run_targeted.")
    _model_args(p, default="digits_vit")
    p.add_argument("--source", required=True, help="image file or skimage:NAME")
    p.add_argument("--target", required=True, help="image file or skimage:NAME (both are resized to the model's size)")
    p.add_argument("--out", default="runs/targeted.png", help="result image (8-bit PNG, so a .png name; default "
                                                               "runs/targeted.png); .json and _figure.png beside")
    p.add_argument("--iters", type=count(1), default=100, help="Dykstra iterations for the [0, 1] box (default 100)")
    p.add_argument("--saliency", type=listof(one_of(METHODS, "saliency method"), "saliency methods"),
                   default=list(METHODS), help=f"maps to draw, comma-separated (default {','.join(METHODS)})")
    p.set_defaults(func=cmd_targeted)


FOLDER_POOL = 16  # fingerprint make on a folder reads 16 x --n images unless --max-images says otherwise


def cmd_fingerprint(args) -> int:
    from .io import check_distinct, check_output_dir, check_output_file
    from .runlock import output_lock, run_lock

    # each option serves one action: one given to the other was ignored (make --threshold 0.9 stored 0.25)
    serves = {"data": "make", "split": "make", "max_images": "make", "on_bad_image": "make", "n": "make",
              "scale": "make", "seed": "make", "threshold": "verify", "expect_digest": "verify"}
    stray = [d for d in getattr(args, "given", ()) if serves.get(d, args.action) != args.action]
    if stray:
        raise NsvitError(f"fingerprint {args.action} takes no --{stray[0].replace('_', '-')} (it serves "
                         f"fingerprint {serves[stray[0]]})")
    # two runs on one report folder (the default runs/fingerprint): one's JSON beside the other's PNG;
    # two makes on one --fingerprint: one's digest printed, the other's file kept
    made = {}
    if args.action == "make":  # checked before its lock makes the folders
        check_output_file(args.fingerprint, (".safetensors",), "--fingerprint")
        check_distinct({"--fingerprint": args.fingerprint, "--report": args.report}, _weights_read(args),
                       {"--data": _image_folder(args.data, args.split, "val")}, files=("--fingerprint",))
        made = {"--fingerprint": args.fingerprint}
    from .runlock import check_not_a_run

    report = check_output_dir(args.report, "--report")
    check_not_a_run(report, "--report")  # a finetuning run's folder is that run's
    with run_lock(report), output_lock(made):
        return _fingerprint(args)


def _fingerprint(args) -> int:
    from .analysis import Fingerprint, run_fingerprint_make, run_fingerprint_verify
    from .io import check_output_dir

    rep = check_output_dir(args.report, "--report")
    if args.action == "verify":  # checked before the suspect is loaded
        Fingerprint.load(args.fingerprint, args.expect_digest)
    parts = _load(args)
    if args.action == "make":
        from .data import load_data, parse_spec

        # n challenges from a folder: read FOLDER_POOL x n images spread over its classes, not all of it
        # (an ImageNet val folder is 30 GB as float32)
        _check_default_data(args, parts)
        pool = args.max_images
        if pool is None and parse_spec(args.data, args.split, default_split="val").kind == "folder":
            pool = min(FOLDER_POOL * args.n, MAX_COUNT)  # the user's --n is checked, not this product
        data = load_data(args.data, args.split, parts, pool, args.on_bad_image, default_split="val")
        r = run_fingerprint_make(parts, data, args.fingerprint, rep, n=args.n, scale=args.scale, seed=args.seed)
        print(f"fingerprint of {parts.name}: {r['n']} challenges, nullspace dim {r['nullspace_dim']}, "
              f"owner score {r['owner_check']['score']:.1e} -> {args.fingerprint}; report in {rep}")
        print(f"digest {r['digest']} (keep it apart from the file; verify --expect-digest checks it)")
        return 0
    r = run_fingerprint_verify(parts, args.fingerprint, rep, threshold=args.threshold,
                               expect_digest=args.expect_digest, checkpoint=args.checkpoint)
    print(f"score {r['score']:.4f} (threshold {r['threshold']}): {'VERIFIED' if r['verified'] else 'not verified'}; "
          f"prediction agreement {r['prediction_agreement']:.3f}; report in {rep}")
    return 0


def add_fingerprint(sub) -> None:
    from .analysis.apps import FINGERPRINT_ACTIONS

    p = sub.add_parser("fingerprint", help="make or verify a nullspace fingerprint of a model",
                       description="make: challenge images and noises in the owner's exact patch-embedding "
                                   "nullspace. verify: score a suspect (0 = owner, ~1 = unrelated); derived models "
                                   "(finetuned, pruned, quantised) stay below the threshold. A suspect that "
                                   "retrains its patch embedding escapes. API: nsvit_fast.analysis."
                                   "run_fingerprint_make / run_fingerprint_verify.")
    p.add_argument("action", choices=FINGERPRINT_ACTIONS)
    _model_args(p, default="digits_vit")
    _data_args(p, default="digits", split="val")
    p.add_argument("--fingerprint", default="fingerprint.safetensors",
                   help="fingerprint file (default fingerprint.safetensors)")
    p.add_argument("--n", type=count(1), default=64, help=f"make: challenges (default 64), drawn from --data (a "
                   f"folder: from {FOLDER_POOL} x n of its images spread over its classes, or --max-images)")
    p.add_argument("--scale", type=number(0, MAX_FINGERPRINT_SCALE), default=2.0,
                   help=f"make: noise norm / image norm (default 2, at most {MAX_FINGERPRINT_SCALE:g})")
    p.add_argument("--seed", type=SEED, default=0, help="make: seed of the challenge images and noises (default 0)")
    p.add_argument("--threshold", type=number(0, 1, hi_open=True),
                   help="verify: decision threshold in (0, 1) (default: the fingerprint's)")
    p.add_argument("--expect-digest", type=sha256_hex, help="verify: refuse unless the fingerprint's digest is this one (printed by "
                                           "make)")
    p.add_argument("--report", default="runs/fingerprint", help="folder for the JSON (and make's PNG; default runs/fingerprint)")
    p.set_defaults(func=cmd_fingerprint)


COMMANDS = [add_nullspace, add_pretrain, add_synth, add_profile, add_finetune, add_eval, add_analyze, add_watermark,
            add_targeted, add_fingerprint, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nsvit-fast", description="Robust ViTs by approximate nullspace augmented finetuning "
        "(Liu et al., CPAL 2025). Images are pixels in [0, 1]; models are timm ViTs or digits_vit.")
    parser.add_argument("--version", action="version", version=f"nsvit-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


FS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EISDIR,
             errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EMFILE}


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError, torch.OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "DefaultCPUAllocator: can't allocate memory" in str(e)


def _one_line(text) -> str:
    text = str(text)
    if "\nOriginal Traceback" in text:  # raised in a DataLoader worker: torch re-raises it with the worker's traceback
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last  # "nsvit_fast.data.folders.BadImage: <message>"
    return " ".join(text.split()) or "failed"


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, SLURM, docker stop, torchrun stopping a rank), raised where SIGINT's
    KeyboardInterrupt would be, so a run cleans up the same way: lock released, a fresh run's
    folder given back, no temp files left."""


def _terminate_like_interrupt():
    """Install the SIGTERM handler for this process (the main thread only); returns the old one.
    A forked child (a DataLoader worker) keeps the default: it dies as before."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    pid = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    return signal.signal(signal.SIGTERM, on_term)


def main(argv: list[str] | None = None) -> int:
    import signal

    old = _terminate_like_interrupt()
    try:
        return _main(argv)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # finetune's key=value overrides after an option (--out X --resume seed=1): argparse stops at the option
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            if getattr(args, "command", None):  # point at the command's own help, which lists its options
                parser.prog = f"{parser.prog} {args.command}"
            hint = ("; eval takes the split in --data (digits:test, FOLDER/val)"
                    if args.command == "eval" and any(e.startswith("--split") for e in extra) else "")
            parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    typed = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # the options the user gave (typed, or an abbreviation that changed the value), for commands that
    # refuse the ones that do not apply
    args.given = [a.dest for a in sub._actions if a.option_strings and a.dest != "help" and (
        any(t == o or t.startswith(o + "=") for t in typed for o in a.option_strings)
        or getattr(args, a.dest, None) != a.default)]
    with warnings.catch_warnings(record=True) as caught:  # held back: an error line must be the only line
        warnings.simplefilter("default")
        _said.clear()
        args.release_warnings = lambda: _release_warnings(caught, args)  # a long run's, once it has started
        try:
            empty = [k for k, v in vars(args).items() if isinstance(v, str) and not v.strip()]
            if empty:  # --out '' had fallen back to the default folder, --device '' to auto
                raise NsvitError(f"--{empty[0].replace('_', '-')} is empty")
            if not getattr(args, "distributed", False) and env_int("WORLD_SIZE", 1) > 1:
                # each rank would do the whole job (synth twice) or fight over one folder (eval's lock)
                raise NsvitError(f"{args.command} runs in one process; only finetune runs under "
                                 f"torchrun (WORLD_SIZE={env_int('WORLD_SIZE', 1)})")
            code = int(args.func(args) or 0)
        except NsvitError as e:
            _say(f"nsvit-fast: error: {_one_line(e)}")
            return 2
        except OSError as e:  # the filesystem said no (read-only, full disk...): the user's to fix
            if e.errno not in FS_ERRORS:
                raise
            where = f"{e.filename}: " if e.filename else ""
            _say(f"nsvit-fast: error: {where}{_one_line(e.strerror or e)}")
            return 2
        except (MemoryError, RuntimeError) as e:  # settings too large for the machine: the user's to change
            if not _out_of_memory(e):
                raise
            hint = {"finetune": "lower batch_size and synth.batch_size (key=value), or try --precision bf16",
                    "eval": "lower --max-images, or try --precision bf16"}.get(
                args.command, "lower --batch-size, --num-noises or --max-images")
            _say(f"nsvit-fast: error: out of memory ({_one_line(str(e).splitlines()[0] if str(e) else 'MemoryError')});"
                 f" {hint}")
            return 2
        except Terminated:
            _say("nsvit-fast: terminated (SIGTERM)")
            return 143
        except KeyboardInterrupt:
            _say("nsvit-fast: interrupted")
            return 130
    _release_warnings(caught, args)
    return code


_said: set[str] = set()  # warnings already printed by this command (a run's early ones, at its start)


def _release_warnings(caught: list, args) -> None:
    """Print the held warnings, each once, and empty ``caught``. Each rank has its own (a skipped-image
    count is its shard's), so each says whose it is."""
    who = f"rank {env_int('RANK', 0)}: " if getattr(args, "distributed", False) and env_int("WORLD_SIZE", 1) > 1 else ""
    for line in dict.fromkeys(_one_line(w.message) for w in caught):  # each once, in order
        if line not in _said:
            _said.add(line)
            _say(f"nsvit-fast: warning: {who}{line}")
    caught.clear()


def _say(line: str) -> None:
    """One line on stderr in one write: ranks failing together interleaved print's text and newline."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())

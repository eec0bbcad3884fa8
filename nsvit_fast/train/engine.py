"""The finetuning engine: the paper's Algorithm 1 and its baselines, on one loop.

    for round k in 0..K-1:
        noise_k = method.prepare(ctx)            e.g. a fresh ε-approximate noise learned on the current model
        for s in 0..S-1: one AdamW step on method.loss(batch, noise_k)        (cosine lr over K*S steps)
        validation accuracy; history; checkpoint (atomic); Fig. 4-style trend plot

Checkpoints hold the whole state (weights, EMA, optimiser, scheduler, RNG, batch stream, noise),
so ``resume=True`` continues after a kill at any point and, on the CPU with a fixed seed, ends in
the same weights as an uninterrupted run. Under torchrun every rank takes its slice of each global
batch (the batches of a single-process run) and DistributedDataParallel averages the gradients;
noise synthesis averages the noise gradient, the stop statistic and every held-out measurement
across ranks, so all ranks take the same decisions and hold
the same noise (as the official code does) and synthesis, the main cost, is data-parallel too.
"""

from __future__ import annotations

import contextlib
import importlib
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import build
from ..data.base import ImageDataset, check_labels_fit
from ..errors import MAX_WORKERS, NsvitError, check_count, check_number, check_positive, check_seed
from ..eval.accuracy import accuracy, eval_mode, top1
from ..io import dumps, write_json, write_text
from ..models.base import Adapter
from ..models.loading import save_model
from ..models.registry import adapt
from ..runlock import RUN_FIGURE, RUN_FILES, run_lock
from ..data.batches import TensorBatches
from ..data.stream import AUGMENTS, StreamingData
from ..runtime import Runtime, check_precision
from ..synth.engine import SynthConfig, synthesize
from .. import distributed as dist_util
from .checkpoint import check_header, check_state, damaged, is_finite, is_real, is_whole, load_state, save_state
from .methods.base import own_draws_per_rank
from .methods import DEFAULT_METHOD, MethodConfigs, RoundContext, check_method_configs, method_for, moved_key_error

STATE_FILE = "checkpoint.safetensors"
NOISE_INITS = ("fresh", "warm", "warm_boundary")


@dataclass
class FinetuneConfig(MethodConfigs):
    """Defaults are the paper's (App. C, Algorithm 1): K = 20 rounds of S = 40 steps, AdamW lr 1e-5,
    batch 128, a fresh U(-lim, lim) noise each round. ``noise_init="warm"`` is a documented
    accelerator, not Algorithm 1: it starts each round from the last noise x ``warm_growth``;
    measured on digits over 3 seeds (bench/results/methods.md) it needs 4.2x less synthesis time and
    is more robust than fresh there (2.6-3.9 points on FGSM 4-8/255 and PGD), while the noise norm
    grows each round (to about 595).
    ``noise_init="warm_boundary"`` (the ``*_fast`` configs; bench/results/noise_cost.md) learns round
    0's noise with ``synth`` as configured (the fast configs: ``schedule: boundary``), and starts every
    later round from the last noise grown to just inside ε in forward passes only (on the round's metric
    images: from round 1 a sample of the training data, as the paper's batch stop rule runs)
    (``synth.init_scale="boundary"``), and by at least ``warm_growth``, followed by the paper's descent
    and stop rule. The floor matters: after a few rounds the model ignores the noise at exactly its own
    scale but not at 1.1x (a valley narrow in scale), and a pure rescale would then stall at x1 with
    the noise far inside ε (measured: MSE-prob 0.0005 from round 4 on, digits seed 0). With the
    floor the norm compounds (x1.25 per round); ``warm_max_growth`` > 0 caps it at that many times
    round 0's norm (from the history, so a resumed run keeps the cap): at the cap the growth search
    is skipped and the last noise's direction carries on at the capped norm. ``noise_bank`` M > 1
    (warm_boundary only) learns M noises from M fresh draws in round 0's one batched descent, each
    on ``synth.batch_size // M`` images (a step then costs what one noise's does), and round k uses
    noise k mod M, grown and descended as above and put back; each noise is capped from its own
    round-0 norm. More directions than one, as Algorithm 1 has a new one each round.

    Each method's own hyperparameters are nested under its name, inherited from MethodConfigs
    (``cfg.pgd.eps``, ``cfg.trades.beta``, ``cfg.random.norm``), as synthesis is under ``synth``."""

    method: str = DEFAULT_METHOD  # a name in train.methods.METHODS
    rounds: int = 20              # K
    model_steps: int = 40         # S
    lr: float = 1e-5
    lr_t_max: int = 0             # the model's cosine T_max in steps (0: rounds * model_steps, the lr ends at 0)
    weight_decay: float = 0.01    # AdamW's default, as the paper ("default hyperparameters")
    batch_size: int = 128
    ema: float = 0.0              # EMA decay of the weights for evaluation (0: off; DAT used 0.9998)
    noise_init: str = "fresh"     # fresh (Algorithm 1: U(-lim, lim)) | warm (last noise x warm_growth) | warm_boundary
    warm_growth: float = 1.25
    warm_max_growth: float = 0.0  # warm_boundary: the noise's norm at most this many times round 0's (0: no cap)
    noise_bank: int = 1           # warm_boundary: round 0 learns this many noises at once, rounds use them in turn
    checkpoint_every: int = 0     # also checkpoint every N model steps (0: at the end of rounds only)
    val_images: int = 0           # validation images per round, spread evenly over the set (0: all given)
    tensorboard: bool = False
    seed: int = 0
    precision: str = "fp32"       # fp32 | tf32 | bf16 | fp16: autocast of the model; noise, optimiser state, losses fp32
    compile: bool = False         # torch.compile of the encoder (timm train.py's --torchcompile)
    augment: str = "rrc_flip"     # streamed folders: RandomResizedCrop + flip (timm's) | official (torchvision's) | none
    workers: int = 4              # streamed folders: DataLoader worker processes (at most the usable CPUs)
    synth: SynthConfig = field(default_factory=SynthConfig)


def check_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """Every field in its range; NsvitError naming the first that is not."""
    method_for(cfg, cfg.method)
    check_method_configs(cfg)
    # stored back as ints: 2.0 from the API passes the check and must not reach range() or k % m
    for name in ("rounds", "model_steps", "batch_size"):
        setattr(cfg, name, check_count(name, getattr(cfg, name), 1))
    for name in ("checkpoint_every", "val_images"):
        setattr(cfg, name, check_count(name, getattr(cfg, name), 0))
    cfg.seed = check_seed("seed", cfg.seed)
    check_positive("lr", cfg.lr)
    if cfg.lr > torch.finfo(torch.float32).max:  # the optimizer's step would fail to convert it
        raise NsvitError(f"lr must be <= {torch.finfo(torch.float32).max:.3g} (float32), got {cfg.lr:g}")
    cfg.lr_t_max = check_count("lr_t_max", cfg.lr_t_max, 0)
    if 0 < cfg.lr_t_max < cfg.rounds * cfg.model_steps:  # past T_max torch's cosine climbs back up
        raise NsvitError(f"lr_t_max must be 0 (rounds x model_steps) or at least the run's "
                         f"{cfg.rounds * cfg.model_steps} steps, got {cfg.lr_t_max}")
    check_positive("warm_growth", cfg.warm_growth)
    if not cfg.warm_max_growth >= 0:
        raise NsvitError(f"warm_max_growth must be >= 0 (0: no cap), got {cfg.warm_max_growth}")
    check_number("weight_decay", cfg.weight_decay, lo=0)
    check_precision(cfg.precision)
    if cfg.augment not in AUGMENTS:
        raise NsvitError(f"augment must be one of {', '.join(AUGMENTS)}, got {cfg.augment!r}")
    cfg.workers = check_count("workers", cfg.workers, 0, MAX_WORKERS)  # the --workers flag's range, as a key too
    if cfg.noise_init not in NOISE_INITS:
        raise NsvitError(f"noise_init must be one of {', '.join(NOISE_INITS)}, got {cfg.noise_init!r}")
    cfg.noise_bank = check_count("noise_bank", cfg.noise_bank, 1)
    if cfg.noise_bank > 1 and cfg.noise_init != "warm_boundary":
        raise NsvitError(f"noise_bank {cfg.noise_bank} needs noise_init warm_boundary, got {cfg.noise_init!r}")
    if not 0 <= cfg.ema < 1:
        raise NsvitError(f"ema must be in [0, 1), got {cfg.ema}")
    from ..synth.engine import check_config as check_synth

    try:
        check_synth(cfg.synth)
    except NsvitError as e:  # the finetune config has fields of the same names (weight_decay, seed)
        raise NsvitError(f"synth: {e}") from None
    if cfg.synth.heldout == 0 and (cfg.synth.stop == "heldout" or cfg.synth.schedule == "boundary") \
            and method_for(cfg, cfg.method).learns_noise():
        # the noise is confirmed on held-out images carved from the training data: none to carve.
        # Refused here, not after the starting model's validation pass (a folder's error named no key)
        why = "stop=heldout" if cfg.synth.stop == "heldout" else "schedule=boundary"
        raise NsvitError(f"synth.heldout 0 leaves synth.{why} no held-out images to confirm the noise on: give "
                         f"synth.heldout >= 1 (default 256)")
    if cfg.noise_bank > cfg.synth.batch_size:  # after synth's own checks: batch_size 0 is named as such
        raise NsvitError(f"noise_bank {cfg.noise_bank} is more than synth.batch_size {cfg.synth.batch_size}: "
                         "each noise of the bank descends on synth.batch_size // noise_bank images")
    return cfg


def make_config(base: FinetuneConfig | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """FinetuneConfig from overrides, where a nested config (``synth``, a method's own) may be a
    mapping or ``synth.key`` flat keys. An old flat method key (``pgd_eps``) is refused with its new name.

    Returns a checked FinetuneConfig (``base`` or the defaults, with ``overrides`` applied). Raises
    NsvitError for an unknown key (naming the nearest one), a value of the wrong type or out of
    range, or a moved key."""
    if overrides is not None and not isinstance(overrides, dict):
        raise NsvitError(f"finetune settings must be a mapping of keys, got {overrides!r}")
    o = dict(overrides or {})
    if isinstance(base, dict):  # config={"rounds": 2}: the same as overrides
        base, o = None, {**base, **o}
    if base is not None and not isinstance(base, FinetuneConfig):
        raise NsvitError(f"config must be a FinetuneConfig or a mapping of its keys, got {type(base).__name__}")
    base = base or FinetuneConfig()
    for k in o:
        err = moved_key_error(k)
        if err is not None:
            raise err
    nested = [f.name for f in dataclasses.fields(FinetuneConfig) if dataclasses.is_dataclass(getattr(base, f.name))]
    nested_o: dict[str, dict[str, Any]] = {}
    for name in nested:
        given = o.pop(name, None)
        if dataclasses.is_dataclass(given) and isinstance(given, type(getattr(base, name))):
            o[name], given = given, None  # a whole config object, e.g. synth=SynthConfig(...)
        if given is not None and not isinstance(given, dict):
            raise NsvitError(f"finetune key {name!r} must be a mapping of its keys, got {given!r}")
        nested_o[name] = dict(given or {})
        for k in [k for k in o if isinstance(k, str) and k.startswith(name + ".")]:
            nested_o[name][k[len(name) + 1:]] = o.pop(k)
    cfg = build(FinetuneConfig, base, o, "finetune")
    for name, sub in nested_o.items():
        if sub:
            cur = getattr(cfg, name)
            cfg = dataclasses.replace(cfg, **{name: build(type(cur), cur, sub, name)})
    return check_config(cfg)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the finetuned model (trained in place), one log record per
    round (as in log.jsonl), the output folder (None without one) and the timm EMA module (None
    without ``ema``)."""

    parts: Adapter
    history: list[dict]
    out_dir: Path | None
    ema: Any = None

    @property
    def eval_parts(self) -> Adapter:
        """The model to evaluate: the EMA copy if EMA ran, else the finetuned model."""
        return self.parts if self.ema is None else ema_parts(self.parts, self.ema)


def ema_parts(parts: Adapter, ema) -> Adapter:
    """The EMA weights wrapped like ``parts`` (same normalisation, architecture and kwargs)."""
    return adapt(ema.module, parts.data_config["mean"], parts.data_config["std"], parts.name + "+ema",
                 arch=parts.arch, model_kwargs=parts.model_kwargs if parts.kwargs_known else None)


class _LossModule(nn.Module):
    """The method's loss as a module, so DistributedDataParallel can wrap it (it calls forward)."""

    def __init__(self, parts, method):
        super().__init__()
        self.parts, self.method = parts, method

    def forward(self, x, y, noise):
        return self.method.loss(self.parts, x, y, noise)


def _with_defaults(theirs: dict, defaults: dict) -> dict:
    """A checkpoint's config with the keys it lacks (settings added since it was written, nested
    ones too: ``random.match``) at what the older version ran with: the method's ``absent_means``,
    else today's default. An absent key then matches only a run that does the same."""
    from .methods import METHODS

    absent = {name: m.absent_means for name, m in METHODS.items() if m.absent_means}
    defaults = {k: {**v, **absent.get(k, {})} if isinstance(v, dict) else v for k, v in defaults.items()}
    out = {k: theirs.get(k, v) for k, v in defaults.items()}
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = {**v, **out[k]}
    return {**theirs, **out}


class Engine:
    """One finetuning run: optimiser, cosine schedule, EMA, batch stream, checkpoints and logs
    around a method's ``prepare`` / ``loss`` (built by :func:`finetune`, which holds the run lock).

    Raises NsvitError for ``synth.mode="reference"`` under several processes (when the method
    needs noise) and for batch sizes that do not divide by the number of processes.
    """

    def __init__(self, parts: Adapter, train: ImageDataset | Path, cfg: FinetuneConfig, val: ImageDataset | None,
                 out_dir: Path | None, progress: bool, runtime: Runtime, on_bad_image: str = "error"):
        self.parts, self.train, self.cfg, self.val, self.rt = parts, train, cfg, val, runtime
        self.on_bad_image = on_bad_image
        self._val_folder = None  # the validation folder's FolderImages, made at the first validation
        self.out_dir, self.progress = out_dir, progress
        self.on_round: Callable[[list[dict]], None] | None = None  # rank 0, after each round's record
        self._t0 = 0.0               # the current round's start (perf_counter)
        self._elapsed_before = 0.0   # a resumed round's seconds before the stop
        self.method = method_for(cfg, cfg.method)
        self.rank, self.world = dist_util.rank_world()
        self._ids = {"train": data_identity(train), "val": data_identity(val)}  # once: a pixel digest each
        if self.world > 1:  # before DDP's broadcast, which would make rank 0's weights and mean / std win
            from ..models import weights_fingerprint  # silently (and a model of another shape fail in a traceback)

            model = {"name": parts.name, "arch": parts.arch, "model_kwargs": parts.model_kwargs,
                     "data_config": parts.data_config,
                     "class_names": parts.class_names, "weights": weights_fingerprint(parts)}
            dist_util.check_same("settings, model or data", {"config": asdict(cfg), "model": model, **self._ids})
        if self.world > 1 and cfg.synth.mode == "reference" and self.method.learns_noise():
            raise NsvitError("synth mode reference runs in one process; use mode fast under torchrun")
        if cfg.batch_size % self.world or cfg.synth.batch_size % self.world:
            raise NsvitError(f"batch sizes ({cfg.batch_size}, synth {cfg.synth.batch_size}) must divide by the "
                             f"{self.world} processes")
        self.device = runtime.device
        total = cfg.lr_t_max or cfg.rounds * cfg.model_steps
        self.opt = torch.optim.AdamW(parts.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(parts.model, decay=cfg.ema)
        if isinstance(train, ImageDataset):
            self.stream = TensorBatches(train, cfg.batch_size, cfg.seed, self.rank, self.world, self.device)
        else:  # a folder, streamed: nothing holds it whole
            self.stream = StreamingData(train, parts, cfg.batch_size, cfg.seed, cfg.augment, cfg.workers,
                                        device=self.device, rank=self.rank, world=self.world,
                                        on_bad_image=on_bad_image)
        self.scaler = runtime.grad_scaler()
        self.loss_module = dist_util.wrap(_LossModule(parts, self.method))
        self.noise: torch.Tensor | None = None
        self.last_ns_noise: torch.Tensor | None = None
        self.history: list[dict] = []
        self.round_info: dict[str, Any] = {}
        self.round_losses: dict[str, float] = {}
        self.start_weights: str | None = None  # the first start's weights fingerprint, kept across resumes
        self.tb = None

    # -- state --
    def meta(self) -> dict[str, Any]:
        """The run's identity and history for the checkpoint header: config, model name, arch,
        model kwargs, per-round records."""
        return {"config": asdict(self.cfg), "model": self.parts.name, "arch": self.parts.arch,
                "model_kwargs": self.parts.model_kwargs, "data_config": self.parts.data_config,
                "history": self.history, "data": {"train": self._ids["train"], "val": self._ids["val"]},
                "start_weights": self.start_weights}

    def save(self, k: int, s: int) -> None:
        """Checkpoint (on rank 0, with an out_dir) the state to resume at round ``k``, step ``s``:
        weights, optimiser, schedule, EMA, batch stream, noises, round records (written atomically)."""
        if self.out_dir is None or self.rank != 0:
            return
        progress = {"round": k, "step": s, "round_info": self.round_info, "round_losses": self.round_losses}
        if s:  # mid-round: the seconds so far, so a resumed round's round_seconds is the whole round's
            progress["round_seconds"] = round(time.perf_counter() - self._t0, 3)
        if self.scaler is not None:
            progress["grad_scaler"] = self.scaler.state_dict()
        save_state(self.out_dir / STATE_FILE, parts=self.parts, opt=self.opt, sched=self.sched, ema=self.ema,
                   stream=self.stream, tensors={"noise": self.noise, "last_ns_noise": self.last_ns_noise},
                   progress=progress, meta=self.meta())

    def restore(self) -> tuple[int, int]:
        """Load the out_dir checkpoint into this engine (in place) and return (round, step) to
        resume at. The whole file is checked first (:meth:`check_checkpoint`), so a refused one
        changes nothing. Raises NsvitError when the checkpoint belongs to another run (another model or
        config; checkpoint_every and workers may differ) or is damaged or hand-edited."""
        path = self.out_dir / STATE_FILE
        from ..io import load_tensors

        t, m = load_tensors(path)
        k, s = self.check_checkpoint(path, t, m)  # the whole file, before touching any state
        try:  # a backstop: a checked state restores without error
            tensors, m = load_state(path, parts=self.parts, opt=self.opt, sched=self.sched, ema=self.ema,
                                    stream=self.stream, loaded=(t, m))
            self.noise, self.last_ns_noise = tensors.get("noise"), tensors.get("last_ns_noise")
            self.history = [dict(h) for h in m["history"]]
            self.start_weights = m.get("start_weights")
            p = m["progress"]
            self.round_info, self.round_losses = dict(p["round_info"]), dict(p["round_losses"])
            self._elapsed_before = float(p.get("round_seconds", 0.0))  # older checkpoints: the part after it
            if self.scaler is not None and "grad_scaler" in p:
                self.scaler.load_state_dict(p["grad_scaler"])
        except NsvitError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            why = str(e).splitlines()[0] if str(e) else ""
            raise damaged(path, f"cannot be restored ({type(e).__name__}: {why})") from None
        return k, s

    def check_checkpoint(self, path: Path, t: dict[str, torch.Tensor], m: dict[str, Any]) -> tuple[int, int]:
        """Check a checkpoint's tensors ``t`` and metadata ``m`` whole against this run, changing
        nothing: its header, that it is this run's (model and config), the progress (round and step
        within the config's range), the history (one record per finished round), the round's own
        records, the GradScaler, the noises the method goes on with, then
        :func:`~nsvit_fast.train.checkpoint.check_state` (weights, optimiser, schedule, RNG, batch
        stream). Returns (round, step) to resume at. Raises NsvitError naming the first problem."""
        check_header(path, m)
        cfg = self.cfg
        mine, theirs = asdict(cfg), _with_defaults(m["config"], asdict(FinetuneConfig()))
        # another method's hyperparameters (a plain run's random block) do not change this run
        unused = {f.name for f in fields(MethodConfigs)} - {cfg.method}
        diff = [k for k in mine if mine[k] != theirs[k] and k not in ("checkpoint_every", "workers", *unused)]
        if m["arch"] != self.parts.arch or m["model_kwargs"] != json.loads(json.dumps(self.parts.model_kwargs)):
            raise NsvitError(f"{path} belongs to another run (model {m['arch']} {m['model_kwargs']} there, "
                             f"{self.parts.arch} {self.parts.model_kwargs} here); use another --out")
        dc, mine_dc = m.get("data_config"), json.loads(json.dumps(self.parts.data_config))
        if dc is not None and not isinstance(dc, dict):
            raise damaged(path, f"'data_config' must be a JSON object, got {dc!r}"[:200])
        if dc is not None and dc != mine_dc:  # absent before it was recorded: not checked
            key = next(k for k in {**mine_dc, **dc} if dc.get(k) != mine_dc.get(k))
            there = dc.get(key, "<absent>")
            raise NsvitError(f"{path} belongs to a run of a model with other input settings ({key} {there!r} there, "
                             f"{mine_dc.get(key)!r} here): resume with the same model or checkpoint, or use another --out")
        if diff:
            pairs = []  # every differing key, nested ones by name (synth.eps), not as whole dicts
            for key in diff:
                a, b = theirs[key], mine[key]
                if isinstance(a, dict) and isinstance(b, dict):
                    pairs += [(f"{key}.{k}", a.get(k, "<absent>"), b.get(k, "<absent>")) for k in {**a, **b}
                              if a.get(k, "<absent>") != b.get(k, "<absent>")]
                else:
                    pairs.append((key, a, b))
            key, a, b = pairs[0]
            more = f"; {len(pairs) - 1} more: {', '.join(k for k, _, _ in pairs[1:])}" if len(pairs) > 1 else ""
            # the user usually wants to go on: the run's own settings are the way (a YAML value, as key=value)
            import shlex  # pasted into a shell: a list's spaces would split it

            same = " ".join(shlex.quote(f"{k}={json.dumps(x, separators=(',', ':'))}") for k, x, _ in pairs[:6]
                            if x != "<absent>")
            raise NsvitError(f"{path} belongs to another run (config key {key!r}: {a!r} there, {b!r} here{more}); "
                             f"to resume it give its settings ({same}{' ...' if len(pairs) > 6 else ''}; "
                             f"its config.json holds them all), or use another --out")
        sw = m.get("start_weights")  # absent before it was recorded
        if sw is not None and not is_fingerprint(sw):
            raise damaged(path, f"'start_weights' must be a weights fingerprint (16 hex digits), got {sw!r}"[:200])
        here = self._ids
        there = m.get("data")  # absent in checkpoints from before it was recorded: not checked
        if there is not None and not (isinstance(there, dict) and set(there) == {"train", "val"}):
            raise damaged(path, f"'data' must be a JSON object with 'train' and 'val', got {there!r}"[:200])
        if there is not None:
            for which in ("train", "val"):
                if not same_data(here[which], there[which]):
                    a, b = there[which], here[which]
                    if isinstance(a, dict) and isinstance(b, dict) and a.get("folder") == b.get("folder") and \
                            isinstance(a.get("classes"), list):
                        gone = [c for c in a["classes"] if c not in b["classes"]]
                        new = [c for c in b["classes"] if c not in a["classes"]]
                        raise NsvitError(f"the class folders of {b['folder']} changed since the run started ("
                                         f"{', '.join(map(str, gone[:3])) or 'none'} gone, {', '.join(new[:3]) or 'none'}"
                                         f" new): labels would shift; put them back, or start a new run in another "
                                         f"--out")
                    raise NsvitError(f"{path} belongs to a run on other {which} data ({_what(there[which])} there, "
                                     f"{_what(here[which])} here); resume with the same data, or use another --out")
        p, history = m["progress"], m["history"]
        k, s = p.get("round"), p.get("step")
        for name, v in (("round", k), ("step", s)):
            if not is_whole(v):
                raise damaged(path, f"progress {name!r} must be a whole number, got {v!r}"[:200])
        if not 0 <= k <= cfg.rounds:
            raise damaged(path, f"progress round {k} is not in 0..{cfg.rounds} (rounds={cfg.rounds})")
        if not 0 <= s < cfg.model_steps or (k == cfg.rounds and s):
            raise damaged(path, f"progress step {s} is not in 0..{cfg.model_steps - 1} (model_steps="
                                f"{cfg.model_steps}{', 0 after the last round' if k == cfg.rounds else ''})")
        for key in ("round_info", "round_losses"):
            if not isinstance(p.get(key), dict):
                raise damaged(path, f"progress {key!r} must be a JSON object, got {p.get(key)!r}"[:200])
        if "round_seconds" in p and not (is_finite(p["round_seconds"]) and p["round_seconds"] >= 0):
            raise damaged(path, f"progress 'round_seconds' must be a finite number >= 0, "
                                f"got {p['round_seconds']!r}"[:200])
        bad = [n for n, v in p["round_losses"].items() if not is_finite(v)]
        if bad:
            raise damaged(path, f"progress round_losses {bad[0]!r} must be a finite number, "
                                f"got {p['round_losses'][bad[0]]!r}"[:200])
        if len(history) != k:
            raise damaged(path, f"'history' holds {len(history)} record(s), but {k} round(s) are done")
        for i, h in enumerate(history):
            if not isinstance(h, dict) or h.get("round") != i or not is_whole(h.get("round")):
                raise damaged(path, f"'history' record {i} must be a JSON object with \"round\": {i}, "
                                    f"got {h!r}"[:200])
        if "round" in p["round_info"]:
            raise damaged(path, "progress round_info must not hold 'round'")
        from .plots import RECORD_NUMBERS

        m_bank = cfg.noise_bank
        for where, rec in [(f"'history' record {i}", h) for i, h in enumerate(history)] + [
                ("progress round_info", p["round_info"])]:
            key = next((key for key in RECORD_NUMBERS if rec.get(key) is not None and not is_real(rec[key])), None)
            if key is not None:
                raise damaged(path, f"{where} {key!r} must be a number or null, got {rec[key]!r}"[:200])
            if "noise_norm" in rec and not (is_finite(rec["noise_norm"]) and rec["noise_norm"] > 0):
                raise damaged(path, f"{where} 'noise_norm' must be a finite number > 0, got {rec['noise_norm']!r}")
            bn = rec.get("bank_norms")
            if bn is not None and not (isinstance(bn, list) and len(bn) == m_bank
                                       and all(is_finite(x) and x > 0 for x in bn)):
                raise damaged(path, f"{where} 'bank_norms' must be {m_bank} finite numbers > 0, got {bn!r}"[:200])
        if self.scaler is not None:  # an fp16 run always writes it: restarting the scale at 65536 would differ
            if "grad_scaler" not in p:
                raise damaged(path, "progress holds no 'grad_scaler', which every fp16 checkpoint has")
            self._check_scaler_state(path, p["grad_scaler"])

        # the noises the run goes on with: the round's (mid-round) and the last learned one (warm starts)
        extra = next((n for n in t if n.startswith("run/") and n not in ("run/noise", "run/last_ns_noise")), None)
        if extra is not None:
            raise damaged(path, f"unexpected tensor {extra!r}")
        done = history + ([p["round_info"]] if s else [])
        need_last = cfg.noise_init != "fresh" and any("synth_steps" in h for h in done)
        shape = tuple(self.parts.token_shape)
        for name, need, want in (("run/noise", need_last or (self.method.needs_noise and s > 0), shape),
                                 ("run/last_ns_noise", need_last, (m_bank, *shape) if m_bank > 1 else shape)):
            if name not in t:
                if need:
                    raise damaged(path, f"tensor {name!r} is missing")
            elif tuple(t[name].shape) != want:
                raise damaged(path, f"tensor {name!r} has shape {tuple(t[name].shape)}, expected {want}")
            elif t[name].dtype != torch.float32:  # the engine writes float32: another dtype is an edit
                raise damaged(path, f"tensor {name!r} is {t[name].dtype}, expected torch.float32")
            elif (name == "run/last_ns_noise" or self.method.learns_noise()) and not bool(
                    t[name].reshape(-1, *shape).flatten(1).norm(dim=1).gt(0).all()):  # a warm start divides by it
                raise damaged(path, f"tensor {name!r} holds a zero noise (a learned noise never is)")
        if need_last and cfg.noise_init == "warm_boundary" and cfg.warm_max_growth > 0 and history:
            first = next((h for h in history if "noise_norm" in h), None)
            if first is None or (m_bank > 1 and "bank_norms" not in first):
                raise damaged(path, "'history' holds no round-0 noise norm, which warm_max_growth caps from")
        check_state(path, t, m, parts=self.parts, opt=self.opt, sched=self.sched, ema=self.ema, stream=self.stream,
                    steps_done=k * cfg.model_steps + s, scaled=self.scaler is not None)
        return k, s

    def _check_scaler_state(self, path: Path, gs: Any) -> None:
        """A GradScaler state as this scaler's: the same keys and factors, a finite scale > 0."""
        fresh = self.scaler.state_dict()
        if not fresh:  # a disabled scaler loads nothing
            return
        if not isinstance(gs, dict) or set(gs) != set(fresh):
            raise damaged(path, f"progress grad_scaler must hold {', '.join(sorted(fresh))}, got {gs!r}"[:200])
        for key, v in fresh.items():
            if key == "scale":
                ok = is_finite(gs[key]) and gs[key] > 0
            elif key == "_growth_tracker":
                ok = is_whole(gs[key]) and 0 <= gs[key] < max(int(fresh.get("growth_interval", 1)), 1)
            else:
                ok = is_real(gs[key]) and gs[key] == v
            if not ok:
                raise damaged(path, f"progress grad_scaler {key!r} is {gs[key]!r}"[:200])

    # -- loop --
    def round_seed(self, k: int) -> int:
        """Round k's seed: (config seed * 100003 + k) mod 2**32 (the noise and the method's draws);
        folded, since a seed of 42949 or more would leave the seeds synthesis accepts."""
        return (self.cfg.seed * 100_003 + k) % 2**32

    def context(self, k: int) -> RoundContext:
        """What the method sees in round k: it reads, the engine keeps its own state."""
        return RoundContext(self.parts, k, self.round_seed(k), lambda: self.learn_noise(k),
                            lambda v: self.eps_scale(k, v))

    def eps_scale(self, k: int, noise: torch.Tensor) -> tuple[float, float]:
        """(s, MSE-prob at s) putting ``noise`` (N, D) just inside ``synth.eps`` on the current model,
        measured on the images round k's synthesis measures its noise on (``synth.heldout`` of them,
        the same seeded choice: a streamed folder's even sample under ``stop=batch``, its carved
        held-out images under ``stop=heldout`` or ``schedule=boundary``), forward passes only. Every
        rank measures the same images, and the scale is averaged across ranks so all agree exactly."""
        from ..synth import CleanCache, scale_to_eps
        from ..synth.engine import split_heldout

        sc = self.cfg.synth
        if isinstance(self.train, ImageDataset):
            images = split_heldout(self.train.images, sc.heldout, self.round_seed(k))[1]
        elif sc.stop == "heldout" or sc.schedule == "boundary":  # synthesis carves these out of the stream
            images = self.stream.carve(sc.heldout, self.round_seed(k))[1].images
        else:
            images = self.stream.sample(sc.heldout or 256).images
        clean = CleanCache(self.parts, images, self.device, autocast=self.rt.autocast)
        with self.rt.matmul_mode():
            s, mse = scale_to_eps(self.parts, noise.to(self.device), clean, self.cfg.synth.eps,
                                  max_rows=self.cfg.synth.max_rows)
        s_all = dist_util.all_mean(torch.tensor([s], dtype=torch.float64, device=self.device))
        return float(s_all), mse

    def learn_noise(self, k: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Round k's ε-approximate noise (N, D) on the current model, warm-started from the last one
        when ``noise_init`` is warm or warm_boundary, and its synthesis statistics for the log.

        With ``noise_bank`` M > 1 (warm_boundary), the first round learns M noises from M fresh draws
        in one batched descent, each on ``synth.batch_size // M`` images so that a step costs what one
        noise's costs; round k then uses noise k mod M, grown to ε on the current model and descended
        as a single warm_boundary noise, and puts it back. ``self.last_ns_noise`` is then (M, N, D)."""
        cfg = self.cfg
        init = None
        scfg = dataclasses.replace(cfg.synth, seed=self.round_seed(k), num_noises=1)
        m, j = cfg.noise_bank, k % cfg.noise_bank
        if cfg.noise_init != "fresh" and self.noise is not None and self.last_ns_noise is not None:
            if cfg.noise_init == "warm":
                init = self.last_ns_noise * cfg.warm_growth
            else:  # warm_boundary: the last noise grown to just inside ε on the updated model, then the paper's descent
                init = self.last_ns_noise[j] if m > 1 else self.last_ns_noise
                cap = 0.0
                if cfg.warm_max_growth > 0:  # round 0's norm from the history, so a resumed run keeps its cap
                    first = next(h for h in self.history if "noise_norm" in h)
                    norm0 = first["bank_norms"][j] if m > 1 else first["noise_norm"]
                    cap = cfg.warm_max_growth * norm0 / float(init.norm())
                scfg = dataclasses.replace(scfg, init_scale="boundary", init_min_scale=cfg.warm_growth,
                                           init_max_scale=cap, schedule="paper")
        elif m > 1:  # the bank's first round: M fresh draws at once, the same rows per step as one noise
            scfg = dataclasses.replace(scfg, num_noises=m, batch_size=scfg.batch_size // m)
        if isinstance(self.train, ImageDataset):
            data = self.train
        else:  # the round's own seeded stream over the training stream's files, with the run's augmentation
            data = self.stream.reseeded(scfg.batch_size, scfg.seed)
        import warnings

        with warnings.catch_warnings(record=True) as said:  # each round's own: two rounds' alike read as one
            warnings.simplefilter("always")
            bank = synthesize(self.parts, data, scfg, init=init, progress=False, runtime=self.rt)
        for w in said:
            warnings.warn(f"round {k}: {w.message}", w.category, stacklevel=2)
        i = j if bank.noises.shape[0] > 1 else 0  # the noise this round uses
        if m == 1:
            self.last_ns_noise = bank.noises[0]
        elif bank.noises.shape[0] == m:
            self.last_ns_noise = bank.noises.clone()
        else:
            self.last_ns_noise[j] = bank.noises[0]
        info = dict(noise_norm=float(bank.norm[i]), mse_prob=float(bank.mse_prob[i]),
                    mse_prob_on=bank.meta["heldout_source"],  # given | carved | train_sample: names the column
                    # what the descent ran with (round 0 of a _fast config: held-out stop at lr x 6)
                    descent_stop=bank.meta["descent_stop"], descent_lr=float(bank.meta["descent_lr"]),
                    batch_mse_prob=float(bank.batch_mse_prob[i]), match_rate=float(bank.match_rate[i]),
                    synth_steps=int(bank.steps.max()), converged=bool(bank.converged.all()),
                    synth_seconds=float(bank.meta["seconds"]), lim=float(bank.meta["lim"]),
                    synth_phase_seconds=dict(bank.meta["phase_seconds"]))
        if bank.noises.shape[0] > 1:  # the bank's norms: each noise's cap is measured from its own
            info.update(bank_norms=[float(x) for x in bank.norm], bank_member=j)
        elif m > 1:
            info.update(bank_member=j)
        if "init_mse_prob" in bank.meta:  # warm_boundary: the last noise's drift on the updated model, its growth
            info.update(init_mse_prob=bank.meta["init_mse_prob"][0], init_scale_factor=bank.meta["init_scale_factor"][0])
        return bank.noises[i], info

    def local_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next training batch: images (b, C, H, W) in [0, 1] and labels (b,), on the device."""
        return self.stream.next()

    def val_accuracy(self) -> float | None:
        """Accuracy of the model to evaluate (the EMA copy when EMA runs) on ``val_images``
        validation images spread evenly over the set (so over a folder's classes, which it lists in
        order; 0: all); None without validation data. A folder is streamed through the eval
        transform, its unreadable files left out under ``on_bad_image: skip`` (one warning)."""
        if self.val is None:
            return None
        parts = self.parts if self.ema is None else ema_parts(self.parts, self.ema)
        if isinstance(self.val, ImageDataset):
            n = self.cfg.val_images or len(self.val)
            idx = torch.linspace(0, len(self.val) - 1, min(n, len(self.val))).round().long()
            with self.rt.autocast():
                return accuracy(parts, self.val.images[idx], self.val.labels[idx])
        if self._val_folder is None:
            from ..eval.source import FolderImages

            self._val_folder = FolderImages(self.val, self.parts, self.cfg.val_images or None, self.cfg.workers,
                                            self.device.type == "cuda", self.on_bad_image)
        hits = seen = 0
        with torch.no_grad(), eval_mode(parts), self.rt.autocast():
            for x, y in self._val_folder.batches(256):
                hits += int((top1(parts(x.to(self.device))).cpu() == y).sum())
                seen += len(y)
        if not seen:
            raise NsvitError(f"{self.val} holds no readable validation images")
        return hits / seen

    def run(self, start_round: int = 0, start_step: int = 0) -> None:
        """Rounds ``start_round``.. of ``model_steps`` steps each, from ``start_step`` in the first:
        a fresh round calls the method's ``prepare`` (its noise), then every step one optimiser
        update on ``loss``; checkpoints every ``checkpoint_every`` steps and at each round's end,
        where the round's record is appended to the history and the logs are written."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        total = cfg.rounds * cfg.model_steps
        bar = tqdm(total=total, initial=start_round * cfg.model_steps + start_step, desc=f"finetune {cfg.method}",
                   disable=True if (not self.progress or self.rank != 0) else None)
        if start_step == 0 and self.history and self.out_dir is not None and self.rank == 0:
            log = self.out_dir / "log.jsonl"  # a kill between a round's checkpoint and its logs: write them now
            if not log.is_file() or len(log.read_bytes().splitlines()) < len(self.history):
                self.write_logs(self.history[-1])
        if self.rank == 0 and self.on_round is not None and self.history:
            self.on_round(self.history)  # a resumed run's earlier rounds first
        for k in range(start_round, cfg.rounds):
            t0 = self._t0 = time.perf_counter() - (self._elapsed_before if start_step else 0.0)
            if start_step == 0:
                bar.set_postfix_str(f"round {k}: preparing ({cfg.method})")  # a noise's descent moves no step
                self.parts.eval()
                # the starting model's val accuracy: Fig. 4 divides by it, and a bad val folder shows now
                start = {"val_acc_start": self.val_accuracy()} if k == 0 and self.val is not None else {}
                ctx = self.context(k)
                self.noise = self.method.prepare(ctx)
                self.round_info, self.round_losses = {**start, **ctx.info}, {}
            elif self.method.rebuild_on_resume:  # objects the checkpoint does not hold (attacks); keep its noise
                self.method.prepare(self.context(k))
            self.parts.train()
            pending: dict[str, torch.Tensor] = {}  # loss sums kept on the device until a checkpoint or the round's end
            host = self.device.type == "cpu"
            for s in range(start_step, cfg.model_steps):
                x, y = self.local_batch()
                with self.rt.autocast():  # each rank its own dropout / drop-path masks for its slice
                    loss, parts_of_loss = own_draws_per_rank(self.loss_module, x, y, self.noise)
                self.opt.zero_grad(set_to_none=True)
                if self.scaler is None:
                    loss.backward()
                    self.opt.step()
                else:  # fp16: scaled loss, unscaled step, skipped when the gradients overflow
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.opt)
                    self.scaler.update()
                self.sched.step()
                if self.ema is not None:
                    self.ema.update(self.parts.model)
                for name, v in {"loss": loss.detach(), **parts_of_loss}.items():  # running means over the round
                    pending[name] = pending.get(name, 0.0) + torch.as_tensor(v).detach().double() / cfg.model_steps
                bar.update(1)
                if host or (s + 1) % 16 == 0:  # on CUDA the loss is read back every 16 steps, not every step
                    bar.set_postfix(round=k, loss=f"{float(loss.detach()):.3f}")
                step = k * cfg.model_steps + s + 1
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and s + 1 < cfg.model_steps:
                    self.fold_losses(pending)
                    self.check_finite(k)
                    self.save(k, s + 1)
            self.fold_losses(pending)
            start_step = 0
            self.check_finite(k)
            self.parts.eval()
            rec = {"round": k, **self.round_info, **{f"train_{n}": round(v, 5) for n, v in self.round_losses.items()},
                   "val_acc": self.val_accuracy(), "lr": self.sched.get_last_lr()[0],
                   "round_seconds": round(time.perf_counter() - t0, 2)}
            self.history.append(rec)
            self.save(k + 1, 0)
            self.write_logs(rec)
            if self.rank == 0 and self.on_round is not None:
                self.on_round(self.history)
        bar.close()

    def check_finite(self, k: int) -> None:
        """Raise NsvitError if the weights (or the round's losses) hold NaN/inf: a diverged run must
        stop before it overwrites the last good checkpoint or writes a NaN model (one host sync)."""
        ok = torch.stack([p.detach().isfinite().all() for p in self.parts.parameters()]).all()
        # under fp16 the GradScaler skips steps whose loss overflowed: there only the weights count
        losses_ok = self.scaler is not None or all(math.isfinite(v) for v in self.round_losses.values())
        if not bool(ok) or not losses_ok:
            raise NsvitError(f"training diverged in round {k}: NaN/inf weights or loss (lr {self.cfg.lr:g}); "
                             f"lower lr" + (f" (the checkpoint in {self.out_dir} holds the last good state)"
                                            if self.out_dir is not None and k > 0 else ""))

    def fold_losses(self, pending: dict[str, torch.Tensor]) -> None:
        """Adds the device-side loss sums to the round's running means (one host sync) and empties them.
        Under torchrun the sums are averaged over the ranks first (every rank folds at the same
        steps), so the log holds the global batch's loss, not rank 0's half."""
        for name, v in pending.items():
            v = dist_util.all_mean(torch.as_tensor(v).clone()) if self.world > 1 else v
            self.round_losses[name] = self.round_losses.get(name, 0.0) + float(v)
        pending.clear()

    def write_logs(self, rec: dict) -> None:
        """On rank 0 with an out_dir: rewrite log.jsonl with the history, add ``rec``'s numbers to
        TensorBoard if enabled, redraw the Fig. 4-style trend. Raises NsvitError when TensorBoard is
        asked for and not installed."""
        if self.out_dir is None or self.rank != 0:
            return
        write_text(self.out_dir / "log.jsonl", "".join(dumps(r) + "\n" for r in self.history))
        if self.cfg.tensorboard:
            if self.tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise NsvitError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            for key, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and key != "round":
                    self.tb.add_scalar(key, v, rec["round"])
            self.tb.flush()
        from .plots import trend_figure

        trend_figure(self.history, self.out_dir / RUN_FIGURE, title=f"{self.parts.name}: {self.cfg.method}")


def data_identity(data) -> Any:
    """What names a data set cheaply (JSON-able): a folder's absolute path; an in-memory set's size,
    a digest of its labels and one of 64 evenly spaced images (a whole pass would cost as much as
    an epoch's reads; labels alone let a folder of the same layout pass for another, cut by
    max_images)."""
    if data is None or not isinstance(data, ImageDataset):
        if data is None:
            return None
        from ..data.folders import class_folders

        # the classes too: a class folder renamed between a stop and --resume relabels every later one
        return {"folder": str(Path(data).resolve()), "classes": class_folders(Path(data))}
    import hashlib

    n = len(data)
    pick = torch.linspace(0, n - 1, min(n, 64)).round().long()
    pixels = data.images[pick].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return [n, hashlib.sha256(data.labels.cpu().numpy().tobytes()).hexdigest()[:16],
            hashlib.sha256(pixels).hexdigest()[:16]]


def same_data(here: Any, there: Any) -> bool:
    """A checkpoint's data identity against this run's; one recorded before the pixel digest
    existed ([size, labels]) is compared on those two."""
    here = json.loads(json.dumps(here))
    if isinstance(here, list) and isinstance(there, list) and len(there) == 2:
        return here[:2] == there
    if isinstance(here, dict) and isinstance(there, str):  # a folder recorded by its path alone
        return here.get("folder") == there
    return here == there


def _run_record(parts, eng: "Engine", path: Path, fresh: bool) -> dict[str, Any]:
    """What config.json adds to the settings so a run folder says what it ran on: the model (name,
    timm arch and settings, normalisation, class names), the data's identities as the checkpoint
    records them, and the starting weights' fingerprint (kept from the first start on a resume)."""
    from ..models import weights_fingerprint

    if fresh:
        eng.start_weights = weights_fingerprint(parts)
    elif eng.start_weights is None:  # a checkpoint from before it held it: config.json's, if it is one
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sw = json.loads(path.read_text()).get("run", {}).get("start_weights")
            eng.start_weights = sw if is_fingerprint(sw) else None
    start = eng.start_weights
    return {"model": parts.name, "arch": parts.arch,
            "model_kwargs": parts.model_kwargs if getattr(parts, "kwargs_known", True) else None,
            "mean": list(parts.data_config["mean"]), "std": list(parts.data_config["std"]),
            "class_names": getattr(parts, "class_names", None), "train_data": eng._ids["train"],
            "val_data": eng._ids["val"], "start_weights": start}


def is_fingerprint(v: Any) -> bool:
    """A :func:`~nsvit_fast.models.weights_fingerprint`: 16 lowercase hex digits."""
    return isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)


def _our_config(path: Path) -> bool:
    """Whether ``path`` is a finetuning run's config.json (not a file of the user's by that name)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and {"method", "rounds", "model_steps", "synth", "seed"} <= set(cfg)


def _what(identity: Any) -> str:
    """A data identity in words, for a refusal."""
    if identity is None:
        return "none"
    if isinstance(identity, list) and len(identity) in (2, 3):
        return f"{identity[0]} images in memory, labels {identity[1]}" + (
            f", pixels {identity[2]}" if len(identity) == 3 else "")
    if isinstance(identity, dict) and isinstance(identity.get("classes"), list):
        c = identity["classes"]
        return f"{identity.get('folder')}, classes {', '.join(map(str, c[:4]))}{', ...' if len(c) > 4 else ''}"
    return str(identity)


def finetune(model, train_data: ImageDataset | str | Path, config: FinetuneConfig | None = None, *,
             val_data: ImageDataset | str | Path | None = None, out_dir: str | Path | None = None,
             resume: bool = False, progress: bool = True, device: str | torch.device | None = "auto",
             on_bad_image: str = "error", on_round: Callable[[list[dict]], None] | None = None,
             on_start: Callable[[], None] | None = None, **overrides: Any) -> FinetuneResult:
    """Finetune ``model`` on ``train_data`` with one of the methods (Algorithm 1 for ``method="ns"``).

    Args:
        model: an adapter or a timm ViT; trained in place (and moved to ``device``).
        train_data: an ImageDataset (pixels in [0, 1], held in memory: the fast path for small data)
            or the path of an ImageFolder tree, streamed through a DataLoader with ``config.workers``
            workers and ``config.augment`` (RandomResizedCrop + flip, timm's, by default). It is
            also the synthesis data of ns / random.
        config: a FinetuneConfig; ``overrides`` replace fields (``rounds=5``, ``synth={"eps": 0.01}``
            or ``**{"synth.eps": 0.01}``, ``precision="bf16"``).
        val_data: images scored after every round (validation accuracy in the log): an ImageDataset
            or a folder (streamed through the eval transform; ``val_images`` of them, 0 = all).
        out_dir: where checkpoints, log.jsonl, the Fig. 4-style plot and the final weights go. A folder
            that holds another run is refused unless ``resume``, and so is one that holds a run's
            files (config.json, log.jsonl, model weights) without its checkpoint; a folder in use by
            a running finetune (its lock file held) is refused always.
        resume: continue from ``out_dir``'s checkpoint (start fresh in a folder without a run).
        device: ``auto`` (CUDA when available; under torchrun this rank's LOCAL_RANK GPU), ``cpu``,
            ``cuda``, ``cuda:N``; None keeps the model where it is.
        on_bad_image: a streamed folder's unreadable file: ``error`` (stop, naming it) or ``skip``
            (the next readable file takes its place).
        on_round: called on rank 0 with the history (every round record so far, a resumed run's
            earlier ones included) as each round ends, e.g. to print its row while the run goes on.
            Under torchrun it runs on rank 0 alone, so it must make no collective call: no
            ``synthesize`` or ``scale_to_eps`` there (they average over the ranks), or it waits forever.
        on_start: called once the run is set up and checked, before its first step (the CLI prints
            the warnings of the set-up then).

    A method's own settings are nested: ``pgd={"eps": 4 / 255}``, ``random={"norms": [...]}`` (the
    per-round NS noise norms to match, e.g. from an ns run's history), or ``**{"trades.beta": 3}``.

    Raises NsvitError for bad settings or data, and CUDA asked for where there is none.
    """
    cfg = make_config(config, overrides)
    parts = adapt(model)
    parts.check_learnable("finetuning")
    dev = next(parts.parameters()).device if device is None else device
    rt = Runtime.create(dev, cfg.precision, cfg.compile)
    parts.to(rt.device)
    if isinstance(train_data, (str, Path)):
        train_data = Path(train_data)
        if not train_data.is_dir():
            raise NsvitError(f"training data folder not found: {train_data}")
    elif isinstance(train_data, ImageDataset):
        parts.check_images(train_data.images[:1])
    else:
        raise NsvitError(f"train_data must be an ImageDataset or a folder path, got {type(train_data).__name__}")
    if isinstance(val_data, str):
        val_data = Path(val_data)
    if val_data is not None and not isinstance(val_data, (ImageDataset, Path)):
        raise NsvitError(f"val_data must be an ImageDataset, a folder path or None, got {type(val_data).__name__}")
    if isinstance(val_data, ImageDataset):
        parts.check_images(val_data.images[:1])
    from ..data import BAD_IMAGE
    from ..data.folders import adopt_class_names, check_val_classes

    adopt_class_names(parts, train_data)  # saved with the weights; val and eval folders read by them
    out = Path(out_dir) if out_dir is not None else None
    resuming = resume and out is not None and (out / STATE_FILE).exists()
    if not resuming:  # on a resume, a renamed training class is named by the data check first
        check_val_classes(parts, val_data)

    if on_bad_image not in BAD_IMAGE:  # checked even for in-memory data: a typo is a typo
        raise NsvitError(f"on_bad_image must be one of {', '.join(BAD_IMAGE)}, got {on_bad_image!r}")
    if cfg.compile:
        parts.compile_encoder()
    torch.manual_seed(cfg.seed)
    rank = dist_util.rank_world()[0]
    with run_lock(out) if out is not None and rank == 0 else contextlib.nullcontext():
        if out is not None and (out / STATE_FILE).exists() and not resume:
            raise NsvitError(f"{out} holds another run ({STATE_FILE}); pass resume=True (--resume) or use another "
                             f"folder")
        if out is not None and (out / "report.json").exists():  # eval refuses a run folder: the reverse too
            raise NsvitError(f"{out} holds an evaluation report (report.json); give the run its own folder")
        if out is not None and not (out / STATE_FILE).exists():  # a run whose checkpoint was deleted: not ours to overwrite
            found = [f for f in (*RUN_FILES, RUN_FIGURE) if f != STATE_FILE and (out / f).exists()]
            if found == ["config.json"] and _our_config(out / "config.json"):  # killed (-9) before its first
                import warnings                                                 # checkpoint: nothing to keep

                warnings.warn(f"{out}: an earlier run stopped before its first checkpoint (only its config.json "
                              f"is there); starting afresh", stacklevel=2)
            elif found == [RUN_FIGURE]:  # a user's, a demo's or analyze trend's figure: the run rewrote it
                raise NsvitError(f"{out} holds a {RUN_FIGURE} that is not this run's; give the run its own folder")
            elif found:
                raise NsvitError(f"{out} holds another run's {found[0]} but no {STATE_FILE} to resume from; use "
                                 f"another folder")
        if out is not None and rank == 0 and out.is_dir():  # a kill -9 mid-write leaves these; the lock is ours
            for f in (*RUN_FILES, RUN_FIGURE):
                for tmp in out.glob(f".{f}.*.tmp"):
                    tmp.unlink(missing_ok=True)
        if cfg.tensorboard:  # found missing at the first round's end, it would leave a run behind
            try:
                importlib.import_module("torch.utils.tensorboard")
            except ImportError:
                raise NsvitError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
            if out is not None and (out / "tensorboard").exists() and not (out / "tensorboard").is_dir():
                raise NsvitError(f"{out / 'tensorboard'} is a file, where tensorboard=True writes its folder")
        eng = Engine(parts, train_data, cfg, val_data, out, progress, rt, on_bad_image)
        eng.on_round = on_round
        if val_data is not None and eng._ids["val"] == eng._ids["train"] and rank == 0:
            import warnings

            warnings.warn("the validation data is the training data: val_acc will measure fit, not accuracy on "
                          "unseen images (give a held-out split or folder)", stacklevel=2)
        check_labels_fit(parts.num_classes, getattr(eng.stream, "dataset", train_data), "the training data")
        if val_data is not None:
            check_labels_fit(parts.num_classes, val_data, "the validation data")
        k0 = s0 = 0
        if resume and out is not None and (out / STATE_FILE).exists():
            k0, s0 = eng.restore()
            check_val_classes(parts, val_data)
        if eng.world > 1:  # each rank restores its own --out: a folder one node lacks, or an older copy,
            from ..models import weights_fingerprint  # trained on mixed state without a word

            dist_util.check_same("checkpoints to resume from (each rank reads its own --out)",
                                 {"at": [k0, s0], "weights": weights_fingerprint(parts)})
        wrote_config = False
        if out is not None and eng.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            wrote_config = not (out / "config.json").exists()
            write_json(out / "config.json", {**asdict(cfg), "run": _run_record(parts, eng, out / "config.json",
                                                                                 fresh=(k0, s0) == (0, 0))})
        if on_start is not None:
            on_start()
        try:
            with rt.matmul_mode():
                eng.run(k0, s0)
        except BaseException:
            if wrote_config and not (out / STATE_FILE).exists():  # stopped before its first checkpoint: nothing
                (out / "config.json").unlink(missing_ok=True)      # to resume, so leave the folder as it was
            raise
        if out is not None and eng.rank == 0:
            save_model(parts, out / "model.safetensors", {"finetuned_by": f"nsvit-fast finetune ({cfg.method})"})
            if eng.ema is not None:
                save_model(ema_parts(parts, eng.ema), out / "model_ema.safetensors")
    return FinetuneResult(parts, eng.history, out, eng.ema)

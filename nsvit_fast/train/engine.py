"""The finetuning engine: the paper's Algorithm 1 and its baselines, on one loop.

    for round k in 0..K-1:
        noise_k = method.prepare(ctx)            e.g. a fresh ε-approximate noise learned on the current model
        for s in 0..S-1: one AdamW step on method.loss(batch, noise_k)        (cosine lr over K*S steps)
        validation accuracy; history; checkpoint (atomic); Fig. 4 trend plot

Checkpoints hold the whole state (weights, EMA, optimiser, scheduler, RNG, batch stream, noise),
so ``resume=True`` continues after a kill at any point and, on the CPU with a fixed seed, ends in
the same weights as an uninterrupted run. Under torchrun every rank takes its slice of each global
batch (the batches of a single-process run) and DistributedDataParallel averages the gradients;
noise synthesis averages the noise gradient and the stop statistic across ranks, so all ranks hold
the same noise (as the official code does) and synthesis, the main cost, is data-parallel too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import build
from ..data.base import ImageDataset
from ..errors import NsvitError, check_positive
from ..eval.accuracy import accuracy
from ..io import write_json, write_text
from ..models.base import Adapter
from ..models.loading import save_model
from ..models.registry import adapt
from ..synth.batches import BatchStream
from ..synth.engine import SynthConfig, synthesize
from .. import distributed as dist_util
from .checkpoint import load_state, save_state
from .methods import DEFAULT_METHOD, MethodConfigs, RoundContext, check_method_configs, method_for, moved_key_error

STATE_FILE = "checkpoint.safetensors"
NOISE_INITS = ("fresh", "warm")


@dataclass
class FinetuneConfig(MethodConfigs):
    """Defaults are the paper's (App. C): K = 20 rounds of S = 40 steps, AdamW lr 1e-5, batch 128,
    except ``noise_init="warm"``: measured on digits over 3 seeds, warm-started noise gives the same
    robustness as the paper's fresh draw with 3.6x less synthesis time (bench/results/methods.md).
    Its norm grows by about the growth factor each round, so warm norms are not the paper's; set
    ``noise_init="fresh"`` for Algorithm 1 exactly.

    Each method's own hyperparameters are nested under its name, inherited from MethodConfigs
    (``cfg.pgd.eps``, ``cfg.trades.beta``, ``cfg.random.norm``), as synthesis is under ``synth``."""

    method: str = DEFAULT_METHOD  # a name in train.methods.METHODS
    rounds: int = 20              # K
    model_steps: int = 40         # S
    lr: float = 1e-5
    weight_decay: float = 0.01    # AdamW's default, as the paper ("default hyperparameters")
    batch_size: int = 128
    ema: float = 0.0              # EMA decay of the weights for evaluation (0: off; DAT used 0.9998)
    noise_init: str = "warm"      # warm (last round's noise x warm_growth) | fresh (the paper: U(-lim, lim))
    warm_growth: float = 1.25
    checkpoint_every: int = 0     # also checkpoint every N model steps (0: at the end of rounds only)
    val_images: int = 0           # validation images per round (0: all given)
    tensorboard: bool = False
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)


def check_config(cfg: FinetuneConfig) -> FinetuneConfig:
    method_for(cfg, cfg.method)
    check_method_configs(cfg)
    for name in ("rounds", "model_steps", "batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise NsvitError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    check_positive("lr", cfg.lr)
    if cfg.noise_init not in NOISE_INITS:
        raise NsvitError(f"noise_init must be fresh or warm, got {cfg.noise_init!r}")
    if not 0 <= cfg.ema < 1:
        raise NsvitError(f"ema must be in [0, 1), got {cfg.ema}")
    from ..synth.engine import check_config as check_synth

    check_synth(cfg.synth)
    return cfg


def make_config(base: FinetuneConfig | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """FinetuneConfig from overrides, where a nested config (``synth``, a method's own) may be a
    mapping or ``synth.key`` flat keys. An old flat method key (``pgd_eps``) is refused with its new name."""
    o = dict(overrides or {})
    base = base or FinetuneConfig()
    for k in o:
        err = moved_key_error(k)
        if err is not None:
            raise err
    nested = [f.name for f in dataclasses.fields(FinetuneConfig) if dataclasses.is_dataclass(getattr(base, f.name))]
    nested_o: dict[str, dict[str, Any]] = {}
    for name in nested:
        given = o.pop(name, None)
        if given is not None and not isinstance(given, dict):
            raise NsvitError(f"finetune key {name!r} must be a mapping of its keys, got {given!r}")
        nested_o[name] = dict(given or {})
        for k in [k for k in o if k.startswith(name + ".")]:
            nested_o[name][k[len(name) + 1:]] = o.pop(k)
    cfg = build(FinetuneConfig, base, o, "finetune")
    for name, sub in nested_o.items():
        if sub:
            cur = getattr(cfg, name)
            cfg = dataclasses.replace(cfg, **{name: build(type(cur), cur, sub, name)})
    return check_config(cfg)


@dataclass
class FinetuneResult:
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
    e = adapt(ema.module, parts.data_config["mean"], parts.data_config["std"], parts.name + "+ema")
    e.arch, e.model_kwargs = parts.arch, parts.model_kwargs
    return e


class _LossModule(nn.Module):
    """The method's loss as a module, so DistributedDataParallel can wrap it (it calls forward)."""

    def __init__(self, parts, method):
        super().__init__()
        self.parts, self.method = parts, method

    def forward(self, x, y, noise):
        return self.method.loss(self.parts, x, y, noise)


class Engine:
    def __init__(self, parts: Adapter, train: ImageDataset, cfg: FinetuneConfig, val: ImageDataset | None,
                 out_dir: Path | None, progress: bool):
        self.parts, self.train, self.cfg, self.val = parts, train, cfg, val
        self.out_dir, self.progress = out_dir, progress
        self.method = method_for(cfg, cfg.method)
        self.rank, self.world = dist_util.rank_world()
        if self.world > 1 and cfg.synth.mode == "reference" and self.method.needs_noise:
            raise NsvitError("synth mode reference runs in one process; use mode fast under torchrun")
        if cfg.batch_size % self.world or cfg.synth.batch_size % self.world:
            raise NsvitError(f"batch sizes ({cfg.batch_size}, synth {cfg.synth.batch_size}) must divide by the "
                             f"{self.world} processes")
        self.device = next(parts.parameters()).device
        self.synth_images = train.images
        total = cfg.rounds * cfg.model_steps
        self.opt = torch.optim.AdamW(parts.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(parts.model, decay=cfg.ema)
        self.stream = BatchStream(len(train), cfg.batch_size, cfg.seed)
        self.loss_module = dist_util.wrap(_LossModule(parts, self.method))
        self.noise: torch.Tensor | None = None
        self.last_ns_noise: torch.Tensor | None = None
        self.history: list[dict] = []
        self.round_info: dict[str, Any] = {}
        self.round_losses: dict[str, float] = {}
        self.tb = None

    # -- state --
    def meta(self) -> dict[str, Any]:
        return {"config": asdict(self.cfg), "model": self.parts.name, "arch": self.parts.arch,
                "model_kwargs": self.parts.model_kwargs, "history": self.history}

    def save(self, k: int, s: int) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        progress = {"round": k, "step": s, "round_info": self.round_info, "round_losses": self.round_losses}
        save_state(self.out_dir / STATE_FILE, parts=self.parts, opt=self.opt, sched=self.sched, ema=self.ema,
                   stream=self.stream, tensors={"noise": self.noise, "last_ns_noise": self.last_ns_noise},
                   progress=progress, meta=self.meta())

    def restore(self) -> tuple[int, int]:
        path = self.out_dir / STATE_FILE
        from ..io import load_tensors

        _, m = load_tensors(path)  # check the identity before touching any state
        mine, theirs = asdict(self.cfg), m.get("config", {})
        diff = [k for k in mine if k in theirs and mine[k] != theirs[k] and k != "checkpoint_every"]
        if m.get("arch") != self.parts.arch or m.get("model_kwargs") != json.loads(json.dumps(self.parts.model_kwargs)):
            raise NsvitError(f"{path} belongs to another run (model {m.get('arch')} {m.get('model_kwargs')} there, "
                             f"{self.parts.arch} {self.parts.model_kwargs} here); use another --out")
        if diff:
            raise NsvitError(f"{path} belongs to another run (config key {diff[0]!r}: {theirs[diff[0]]!r} there, "
                             f"{mine[diff[0]]!r} here); use another --out")
        tensors, m = load_state(path, parts=self.parts, opt=self.opt, sched=self.sched, ema=self.ema,
                                stream=self.stream)
        self.noise, self.last_ns_noise = tensors.get("noise"), tensors.get("last_ns_noise")
        self.history = list(m.get("history", []))
        p = m["progress"]
        self.round_info, self.round_losses = dict(p.get("round_info", {})), dict(p.get("round_losses", {}))
        return int(p["round"]), int(p["step"])

    # -- loop --
    def round_seed(self, k: int) -> int:
        return self.cfg.seed * 100_003 + k

    def context(self, k: int) -> RoundContext:
        """What the method sees in round k: it reads, the engine keeps its own state."""
        return RoundContext(self.parts, k, self.round_seed(k), lambda: self.learn_noise(k))

    def learn_noise(self, k: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Round k's ε-approximate noise (N, D) on the current model, warm-started from the last one
        when ``noise_init="warm"``, and its synthesis statistics for the log."""
        cfg = self.cfg
        init = None
        if cfg.noise_init == "warm" and self.noise is not None and self.last_ns_noise is not None:
            init = self.last_ns_noise * cfg.warm_growth
        scfg = dataclasses.replace(cfg.synth, seed=self.round_seed(k), num_noises=1)
        bank = synthesize(self.parts, self.synth_images, scfg, init=init, progress=False)
        self.last_ns_noise = bank.noises[0]
        info = dict(noise_norm=float(bank.norm[0]), mse_prob=float(bank.mse_prob[0]),
                    batch_mse_prob=float(bank.batch_mse_prob[0]), match_rate=float(bank.match_rate[0]),
                    synth_steps=int(bank.steps[0]), converged=bool(bank.converged[0]),
                    synth_seconds=float(bank.meta["seconds"]), lim=float(bank.meta["lim"]))
        return bank.noises[0], info

    def local_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.stream.next()[self.rank::self.world]
        return self.train.images[idx].to(self.device), self.train.labels[idx].to(self.device)

    def val_accuracy(self) -> float | None:
        if self.val is None:
            return None
        parts = self.parts if self.ema is None else ema_parts(self.parts, self.ema)
        n = self.cfg.val_images or len(self.val)
        return accuracy(parts, self.val.images[:n], self.val.labels[:n])

    def run(self, start_round: int = 0, start_step: int = 0) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        total = cfg.rounds * cfg.model_steps
        bar = tqdm(total=total, initial=start_round * cfg.model_steps + start_step, desc=f"finetune {cfg.method}",
                   disable=True if (not self.progress or self.rank != 0) else None)
        for k in range(start_round, cfg.rounds):
            t0 = time.perf_counter()
            if start_step == 0:
                self.parts.eval()
                ctx = self.context(k)
                self.noise = self.method.prepare(ctx)
                self.round_info, self.round_losses = dict(ctx.info), {}
            elif self.method.rebuild_on_resume:  # objects the checkpoint does not hold (attacks); keep its noise
                self.method.prepare(self.context(k))
            self.parts.train()
            for s in range(start_step, cfg.model_steps):
                x, y = self.local_batch()
                loss, parts_of_loss = self.loss_module(x, y, self.noise)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.sched.step()
                if self.ema is not None:
                    self.ema.update(self.parts.model)
                for name, v in {"loss": loss.detach(), **parts_of_loss}.items():  # running means over the round
                    self.round_losses[name] = self.round_losses.get(name, 0.0) + float(v) / cfg.model_steps
                bar.update(1)
                bar.set_postfix(round=k, loss=f"{float(loss.detach()):.3f}")
                step = k * cfg.model_steps + s + 1
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and s + 1 < cfg.model_steps:
                    self.save(k, s + 1)
            start_step = 0
            self.parts.eval()
            rec = {"round": k, **self.round_info, **{f"train_{n}": round(v, 5) for n, v in self.round_losses.items()},
                   "val_acc": self.val_accuracy(), "lr": self.sched.get_last_lr()[0],
                   "round_seconds": round(time.perf_counter() - t0, 2)}
            self.history.append(rec)
            self.save(k + 1, 0)
            self.write_logs(rec)
        bar.close()

    def write_logs(self, rec: dict) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        write_text(self.out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
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

        trend_figure(self.history, self.out_dir / "fig4_trend.png", title=f"{self.parts.name}: {self.cfg.method}")


def finetune(model, train_data: ImageDataset, config: FinetuneConfig | None = None, *,
             val_data: ImageDataset | None = None, out_dir: str | Path | None = None, resume: bool = False,
             progress: bool = True, **overrides: Any) -> FinetuneResult:
    """Finetune ``model`` on ``train_data`` with one of the methods (Algorithm 1 for ``method="ns"``).

    Args:
        model: an adapter or a timm ViT; trained in place.
        train_data: ImageDataset, pixels in [0, 1] (also the synthesis data of ns / random).
        config: a FinetuneConfig; ``overrides`` replace fields (``rounds=5``, ``synth={"eps": 0.01}``
            or ``**{"synth.eps": 0.01}``).
        val_data: images scored after every round (validation accuracy in the log).
        out_dir: where checkpoints, log.jsonl, the Fig. 4 plot and the final weights go. A folder
            that holds another run is refused unless ``resume``.
        resume: continue from ``out_dir``'s checkpoint (start fresh if there is none).

    A method's own settings are nested: ``pgd={"eps": 4 / 255}``, ``random={"norms": [...]}`` (the
    per-round NS noise norms to match, e.g. from an ns run's history), or ``**{"trades.beta": 3}``.
    """
    cfg = make_config(config, overrides)
    parts = adapt(model)
    if not isinstance(train_data, ImageDataset):
        raise NsvitError(f"train_data must be an ImageDataset, got {type(train_data).__name__}")
    parts.check_images(train_data.images[:1])
    torch.manual_seed(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / STATE_FILE).exists() and not resume:
        raise NsvitError(f"{out} holds another run ({STATE_FILE}); pass resume=True (--resume) or use another folder")
    eng = Engine(parts, train_data, cfg, val_data, out, progress)
    k0 = s0 = 0
    if resume and out is not None and (out / STATE_FILE).exists():
        k0, s0 = eng.restore()
    if out is not None and eng.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(cfg))
    eng.run(k0, s0)
    if out is not None and eng.rank == 0:
        save_model(parts, out / "model.safetensors", {"finetuned_by": f"nsvit-fast finetune ({cfg.method})"})
        if eng.ema is not None:
            save_model(ema_parts(parts, eng.ema), out / "model_ema.safetensors")
    return FinetuneResult(parts, eng.history, out, eng.ema)

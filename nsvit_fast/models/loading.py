"""Create timm models by name and load or save their weights (safetensors or weights-only torch files)."""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import NsvitError
from ..io import load_tensors, save_tensors
from . import embedded
from .base import NORM_RANGE
from .base import Adapter
from .registry import adapt

FORMAT = "nsvit-fast/1"


def _create(arch: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise NsvitError(f"unknown timm model {arch!r}{hint}")
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except NsvitError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if pretrained:
            raise NsvitError(f"could not get pretrained weights for {arch} (this needs network access "
                             f"to the Hugging Face hub, or pass --checkpoint FILE): {first}") from None
        raise NsvitError(f"timm could not create {arch} with {kwargs}: {first}") from None


EMA_KEYS = ("state_dict_ema", "model_ema")  # where timm's train.py (and DAT's) store the EMA weights
WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")  # common wrappers of a state dict


def read_weights(path: str | Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and metadata from a .safetensors file or a torch file (loaded with weights_only=True).

    A timm ``train.py`` checkpoint (the official evaluation's DAT weights are one) holds its
    arguments as an ``argparse.Namespace``: that one class is allowed to the weights-only
    unpickler (a plain attribute holder, no code runs), nothing else beyond tensors and containers.

    Args:
        use_ema: take the EMA weights (``state_dict_ema`` / ``model_ema``, as timm's
            ``--use-ema``); refused when the file holds none.

    Returns:
        (state dict keyed as timm names the parameters, metadata dict; {} for a plain torch file).
        Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

    Raises:
        NsvitError: a missing file, an unreadable or corrupt one, or one that holds no tensors;
            ``use_ema`` with a file without EMA weights.
    """
    path = Path(path)
    if not path.is_file():
        raise NsvitError(f"checkpoint {path} is a folder, not a file" if path.is_dir() else
                         f"checkpoint {path} is not a regular file (a pipe, device or socket)" if path.exists() else
                         f"checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":  # the outputs are checked so: P.SafeTensors is written
        if use_ema:
            raise NsvitError(f"{path}: a safetensors file holds one set of weights; --use-ema reads the EMA "
                             f"weights of a torch training checkpoint ({' / '.join(EMA_KEYS)})")
        return load_tensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # a torch zip archive or a legacy pickle
        raise NsvitError(f"{path} is not a checkpoint: neither safetensors (.safetensors) nor a torch file")
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text advises weights_only=False: never repeat that advice
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            import re

            found = re.search(r"Unsupported (?:global|operand)[^\n.]*", text)
            what = f" ({found.group(0).strip()})" if found else ""
            raise NsvitError(f"{path} holds pickled Python objects beyond tensors{what}; refused (nsvit-fast reads "
                             f"torch files weights-only): save a plain state dict or safetensors") from None
        first = (text.strip().splitlines() or [type(e).__name__])[0]
        raise NsvitError(f"{path} is not a readable torch file (truncated or corrupt?): {first}") from None
    if use_ema:
        key = next((k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if key is None:
            raise NsvitError(f"{path} holds no EMA weights ({' / '.join(EMA_KEYS)}); drop --use-ema")
        obj = {key: obj[key], "metadata": obj.get("metadata")}  # its mean/std hold for the EMA weights too
    for key in (*EMA_KEYS, *WRAPPER_KEYS) if use_ema else WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            meta = obj.get("metadata", {}) if isinstance(obj.get("metadata"), dict) else {}
            obj = obj[key]
            break
    else:
        meta = {}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        ema = next((k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        raise NsvitError(f"{path} does not hold a state dict of tensors"
                         + (f" (only EMA weights, {ema}: add --use-ema / use_ema=True)" if ema else ""))
    return obj, meta


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


PROBE = "patch_embed.proj.weight"  # every ViT the adapter serves has it: where it sits, the model's keys sit


def _clean_keys(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model's own keys. Prefixes are dropped: ``module.`` (DistributedDataParallel),
    ``_orig_mod.`` (torch.compile), and the one the model sits under inside a larger module, as a
    Lightning checkpoint's ``model.`` (its LightningModule's attribute), found where ``PROBE`` sits;
    entries outside that prefix (a loss's weights, metrics) are left out with a warning. Raises
    NsvitError when several prefixes hold a model (a teacher and a student), naming them."""
    for prefix in ("module.", "_orig_mod."):  # saved from DistributedDataParallel, from a torch.compile'd model
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if PROBE in sd:
        return sd
    where = sorted(k[:-len(PROBE)] for k in sd if k.endswith("." + PROBE))
    if len(where) > 1:
        raise NsvitError(f"{source} holds {len(where)} models' weights (under {', '.join(repr(w) for w in where)}); "
                         f"save the one to load on its own (its state_dict())")
    if not where:
        return sd  # not a ViT's weights: load_state names the missing keys
    prefix = where[0]
    rest = [k for k in sd if not k.startswith(prefix)]
    if rest:
        warnings.warn(f"{source}: took the model's weights under {prefix!r}; left out {len(rest)} other "
                      f"entr{'y' if len(rest) == 1 else 'ies'} (e.g. {rest[0]!r})", stacklevel=2)
    return _clean_keys({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, source)


def load_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into the timm ``model``, strictly (``Adapter.load_weights`` calls this).

    Raises:
        NsvitError: missing, unexpected or wrongly shaped keys, or a NaN/inf weight, naming ``source``."""
    sd = _clean_keys(sd, source)
    own = model.state_dict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.device.type == "meta":
            raise NsvitError(f"{source}: weight {k!r} is not a dense tensor with data "
                             f"({type(v).__name__}{', ' + str(v.layout) if isinstance(v, torch.Tensor) else ''}"
                             f"{', meta' if isinstance(v, torch.Tensor) and v.device.type == 'meta' else ''})")
        if k in own and own[k].is_floating_point() and not v.is_floating_point():  # ints, bools, complex
            raise NsvitError(f"{source}: weight {k!r} is {str(v.dtype).replace('torch.', '')}; weights must be "
                             f"float32, float16, bfloat16 or float64")
        if v.is_floating_point() and v.dtype not in WEIGHT_DTYPES:  # float8 and the like: isfinite has no kernel
            raise NsvitError(f"{source}: weight {k!r} is {str(v.dtype).replace('torch.', '')}; weights must be "
                             f"float32, float16, bfloat16 or float64")
        if v.is_floating_point() and k in own and own[k].is_floating_point() and v.dtype != own[k].dtype:
            v = v.to(own[k].dtype)  # as load_state_dict will: a float64 1e300 becomes inf in float32
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NsvitError(f"{source}: weight {k!r} holds {int((~torch.isfinite(v)).sum())} NaN or inf "
                             f"value(s) (or values beyond {str(v.dtype)[6:]}'s range); refused (a diverged or "
                             f"corrupt checkpoint)")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"shape mismatch e.g. {wrong[:2]}")
        hint = "wrong model or --num-classes?"
        pos = sd.get("pos_embed")
        if pos is not None and "pos_embed" in own and tuple(pos.shape) != tuple(own["pos_embed"].shape):
            hint = "wrong model, or built at another --img-size? (its pos_embed has another number of tokens)"
        raise NsvitError(f"{source} does not fit this model ({'; '.join(parts)}); {hint}")
    model.load_state_dict(sd, strict=True)


def _dat_name(checkpoint) -> bool:
    """The official get_model_and_config switches to ImageNet's mean/std when "dat" is anywhere in
    the checkpoint's path (a /data/ folder too). Here: "dat" as a word of the file's name
    (vit_base_patch16_224-dat.pth.tar, dat_vit.pth), and only to warn: no statistics change unasked."""
    import re

    return re.search(r"(?<![a-z])dat(?![a-z])", Path(checkpoint).name.lower()) is not None


def load_model(name: str | None = None, checkpoint: str | Path | None = None, num_classes: int | None = None,
               pretrained: bool = False, use_ema: bool = False, mean=None, std=None, **kwargs) -> Adapter:
    """A timm ViT by name, wrapped in its adapter (pixels in [0, 1] in, logits out).

    Args:
        name: timm architecture (``vit_small_patch32_224``...) or ``digits_vit``, the embedded model.
            May be omitted when ``checkpoint`` was saved by nsvit-fast (its metadata names the arch).
        checkpoint: local weights: ``.safetensors``, or a torch file read with ``weights_only=True``.
        num_classes: head size; by default the checkpoint's (or timm's default without one).
        pretrained: download timm's pretrained weights. Needs network: only when asked.
        use_ema: a torch training checkpoint's EMA weights (``state_dict_ema``, as timm's
            ``--use-ema`` and the official evaluation of the DAT weights).
        mean, std: the pixel normalisation the weights were trained with, 1 or C numbers each (as
            timm's ``--mean/--std``), when it is not the architecture's: e.g. ImageNet's statistics
            for weights trained with them under a name whose timm config says 0.5. They replace
            the checkpoint's recorded ones too, and are saved with the model.
        **kwargs: extra timm constructor arguments (``img_size=...``).

    Returns:
        the adapter, in eval mode, recording ``arch`` and ``model_kwargs``; ``mean``/``std`` when
        given, else a checkpoint's own (from its metadata), else the architecture's.

    Raises:
        NsvitError: no name and no architecture in the checkpoint, a checkpoint of another
            architecture, an unknown name, weights that do not fit, pretrained weights without
            network, or an architecture no adapter serves.
    """
    from ..errors import check_count

    if name is not None and not isinstance(name, str):
        raise NsvitError(f"model name must be a string, got {type(name).__name__}")
    if num_classes is not None:
        num_classes = check_count("num_classes", num_classes)
    if not isinstance(pretrained, bool):  # pretrained="no" is truthy: a download nobody asked for
        raise NsvitError(f"pretrained must be True or False, got {pretrained!r}")
    if not isinstance(use_ema, bool):
        raise NsvitError(f"use_ema must be True or False, got {use_ema!r}")
    if use_ema and checkpoint is None:
        raise NsvitError("use_ema reads a checkpoint's EMA weights: give a checkpoint")
    sd, meta = (None, {})
    if name == embedded.NAME and pretrained:  # the embedded weights were used, without a word
        raise NsvitError(f"{embedded.NAME} ships its own weights: drop --pretrained (timm has none for it)")
    if name == embedded.NAME and checkpoint is None:
        checkpoint = embedded.CHECKPOINT
        if not checkpoint.is_file():
            raise NsvitError(f"the embedded checkpoint {checkpoint} is missing; regenerate it with: "
                             f"{embedded.REGENERATE}")
    if checkpoint is not None:
        sd, meta = read_weights(checkpoint, use_ema)
    other = {"nsvit-fast/finetune-state": "a finetuning run's resume state (checkpoint.safetensors); its model "
                                          "is the run's model.safetensors",
             "nsvit-fast/noise-bank": "a noise bank (synth's output), not model weights",
             "nsvit-fast/fingerprint": "a fingerprint (fingerprint make's output), not model weights"}
    if meta.get("kind") in other:  # named as what it is, not as 150 missing keys
        raise NsvitError(f"{checkpoint} is {other[meta['kind']]}")
    arch = meta.get("arch")
    if arch is not None and not isinstance(arch, str):
        raise NsvitError(f"{checkpoint}: metadata 'arch' must be a model name, got {arch!r}")
    unrecorded = "model_kwargs" in meta and meta["model_kwargs"] is None  # saved from a model built outside
    if not unrecorded and not isinstance(meta.get("model_kwargs", {}), dict):
        raise NsvitError(f"{checkpoint}: metadata 'model_kwargs' must be a mapping, got {meta['model_kwargs']!r}")
    if unrecorded and name is None:  # the default build may differ in what leaves the shapes alone (num_heads)
        raise NsvitError(f"{checkpoint}: its {arch} was built outside nsvit-fast, with timm settings nobody "
                         f"recorded: give the model name (--model {arch}, or load_model('{arch}', checkpoint=..., "
                         f"**its settings)) to say which model it is")
    model_kwargs = dict(meta.get("model_kwargs") or {})
    if name == embedded.NAME and arch is not None and (
            arch != embedded.ARCH or any(model_kwargs.get(k, v) != v for k, v in embedded.KWARGS.items()
                                         if k != "num_classes") or set(model_kwargs) - set(embedded.KWARGS)):
        raise NsvitError(f"checkpoint {checkpoint} holds a {arch} {model_kwargs}, not a {embedded.NAME}")
    if name is None and arch is None:
        raise NsvitError("give a model name: the checkpoint does not say which architecture it holds")
    # a pretrained tag (".fb_in22k_ft_in1k") names the data config, not the architecture: compared without it
    if (name is not None and name != embedded.NAME and arch is not None
            and name.partition(".")[0] != arch.partition(".")[0]):
        raise NsvitError(f"checkpoint {checkpoint} holds a {arch}, not a {name}")
    if name is not None and "." in name and arch is not None:
        arch = name  # the tag the caller names (its crop and interpolation) over the file's
    if name == embedded.NAME and arch is None:
        arch, model_kwargs = embedded.ARCH, dict(embedded.KWARGS)
    arch = arch or name
    model_kwargs.update(kwargs)
    if num_classes is not None:
        model_kwargs["num_classes"] = int(num_classes)
    if sd is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # load_weights warns about what it leaves out, once
            own = _clean_keys(sd, str(checkpoint))
    if num_classes is None and sd is not None and "num_classes" not in model_kwargs and "head.weight" in own:
        model_kwargs["num_classes"] = int(own["head.weight"].shape[0])
    # pixels are in [0, 1]: a mean far outside it or a std near 0 (hand-edited metadata, or a typo in
    # --mean) would give NaN or saturated logits and a silently wrong evaluation, not an error
    norm = {}
    for key, given in (("mean", mean), ("std", std)):
        lo, hi = NORM_RANGE[key]
        for where, val in ((f"{checkpoint}: metadata {key!r}", meta.get(key)), (key, given)):
            if val is not None and (not isinstance(val, (list, tuple)) or not val or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi for v in val)):
                raise NsvitError(f"{where} must be a list of numbers in [{lo:g}, {hi:g}] (pixel normalisation), "
                                 f"got {val!r}")
        norm[key] = meta.get(key) if given is None else [float(v) for v in given]  # the caller's first
    _check_record(checkpoint, meta)
    if checkpoint is not None and norm["mean"] is None and norm["std"] is None and _dat_name(checkpoint):
        from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

        warnings.warn(f"{checkpoint}: the official evaluation reads DAT weights (a checkpoint named '*dat*') with "
                      f"ImageNet's mean {list(IMAGENET_MEAN)} and std {list(IMAGENET_STD)}, not the architecture's "
                      f"timm config; if these are DAT weights give --mean {' '.join(map(str, IMAGENET_MEAN))} "
                      f"--std {' '.join(map(str, IMAGENET_STD))} (load_model(..., mean=, std=); in eval they "
                      f"apply to --checkpoint, so give DAT weights there, not as --compare)", stacklevel=2)
    parts = create_model(arch, name=name or "", mean=norm["mean"], std=norm["std"],
                         pretrained=pretrained and sd is None, **model_kwargs)
    if sd is not None:
        parts.load_weights(sd, str(checkpoint))
    names = meta.get("class_names")
    if names is not None:  # the class folders a finetune learned: a val or eval folder is read by them
        if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)
                and len(set(names)) == len(names) == parts.num_classes):
            raise NsvitError(f"{checkpoint}: metadata 'class_names' must be {parts.num_classes} distinct names, one "
                             f"per output (edited or corrupt file)")
        parts.class_names = names
    parts.eval()
    return parts


def create_model(arch: str, *, name: str = "", mean=None, std=None, pretrained: bool = False,
                 **kwargs) -> Adapter:
    """A new timm model (random init, or timm's pretrained weights), wrapped in its adapter, which
    records ``arch`` and ``kwargs`` so that ``save_model`` / ``load_model`` can rebuild it.

    Args:
        arch: timm architecture name.
        name: how reports name the model; by default ``arch``.
        mean, std: normalisation; by default the architecture's timm data config's.
        pretrained: download timm's pretrained weights (needs network).
        **kwargs: timm constructor arguments (``img_size=...``, ``num_classes=...``).

    Raises:
        NsvitError: an unknown name (with near names), arguments timm refuses, weights that cannot
            be downloaded, or an architecture no adapter serves.
    """
    model = _create(arch, kwargs, pretrained)
    return adapt(model, mean, std, name or arch, arch=arch, model_kwargs=kwargs)


RECORD = ("arch", "model_kwargs", "mean", "std")  # what rebuilds the model around its weights


DIGEST_VERSION = 2  # 2: class_names digested too


def record_digest(meta: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the architecture record (RECORD, and ``class_names`` when the file
    has them) as JSON: written by save_model, checked by load_model, so that an edit of, e.g.,
    ``global_pool`` or ``num_heads`` (which leave every weight's shape as it was), or two class names
    swapped, cannot silently build another model around the weights."""
    import hashlib
    import json

    record = [meta.get(k) for k in RECORD]
    # which output is which class (a swap would score another task); files of digest version 1
    # (before 2026-12-07) were digested without them and still load
    if meta.get("class_names") is not None and meta.get("record_digest_version") == DIGEST_VERSION:
        record.append(meta["class_names"])
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(v: Any) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _check_record(checkpoint, meta: dict[str, Any]) -> None:
    """A checkpoint's record against its digest (files written before the digest pass unchecked)."""
    if "record_digest" in meta and meta["record_digest"] != record_digest(meta):
        raise NsvitError(f"{checkpoint}: its architecture record ({', '.join(RECORD)}, class_names) is not the one saved "
                         f"with the weights (record_digest differs): edited metadata would build another model")


def save_model(adapter: Adapter, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the model's weights as safetensors (atomically) with what load_model needs to rebuild it
    (``arch``, ``model_kwargs``, mean and std, and their :func:`record_digest`) and ``metadata``;
    returns the path written.
    ``adapter`` is an adapter or a timm ViT (adapted here). ``metadata`` values must be
    JSON-serialisable. Raises NsvitError for a model the adapters do not serve (a name, a ResNet),
    and when the file cannot be written (a folder at ``path``, no permission, a full disk)."""
    adapter = adapt(adapter)
    meta = {"format": FORMAT, "nsvit_fast_version": __version__, "arch": adapter.arch,
            # None: built outside nsvit-fast (adapt(timm_model)); load_model then asks which model it is
            "model_kwargs": adapter.model_kwargs if getattr(adapter, "kwargs_known", True) else None,
            "mean": list(adapter.data_config["mean"]), "std": list(adapter.data_config["std"])}
    if getattr(adapter, "class_names", None) is not None:
        meta["class_names"] = list(adapter.class_names)
    meta.update(metadata or {})
    try:
        meta["record_digest_version"] = DIGEST_VERSION
        meta["record_digest"] = record_digest(meta)
    except TypeError:  # e.g. create_model(..., act_layer=nn.SiLU): a class, which no file can record
        bad = next((k for k, v in (meta["model_kwargs"] or {}).items() if not _jsonable(v)), "model_kwargs")
        raise NsvitError(f"cannot save {adapter.name}: its setting {bad}={meta['model_kwargs'].get(bad)!r} is not "
                         f"a JSON value, so load_model could not rebuild it; build the model with names or "
                         f"numbers (e.g. act_layer='silu')") from None
    return save_tensors(path, dict(adapter.weights()), meta)


def weights_fingerprint(adapter: Adapter) -> str:
    """A short hash (16 hex digits) of the model weights, over names and float32 values: noise banks
    and runs record which model they belong to. Reads every weight as float32 on the CPU, so the
    same weights give the same hash on any device and in any dtype that holds them exactly.
    ``adapter``: an adapter or a timm ViT. Raises NsvitError for a model the adapters do not serve."""
    import hashlib

    adapter = adapt(adapter)
    h = hashlib.sha256()
    for k, v in sorted(adapter.weights().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


"""The whole state of a finetuning run in one safetensors file, written atomically.

Tensors: model weights (``model/...``), EMA weights (``ema/...``), AdamW state (``opt/<i>/<key>``),
the round's noise, the torch RNG state and the batch stream (generator state, permutation).
JSON metadata: round and step, scheduler and optimiser hyperparameters, the history of finished
rounds, the config and the model's identity. One file means a kill at any moment leaves either
the previous checkpoint or the new one, never a mix. A resume checks the whole file against the
run (:func:`check_header`, :func:`check_state`) before it restores anything, so a hand-edited or
damaged checkpoint is refused with one line, never half-loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import NsvitError
from ..io import load_tensors, save_tensors

KIND = "nsvit-fast/finetune-state"


def save_state(path: str | Path, *, parts, opt, sched, ema, stream, tensors: dict[str, torch.Tensor | None],
               progress: dict[str, Any], meta: dict[str, Any]) -> Path:
    """``tensors``: the run's own tensors (the round's noise, the last NS noise...); None values are skipped."""
    t: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in parts.weights().items()}
    if ema is not None:
        t.update({f"ema/{k}": v for k, v in ema.module.state_dict().items()})
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        for k, v in st.items():
            t[f"opt/{i}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    t.update({f"run/{k}": v for k, v in tensors.items() if v is not None})
    t["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        t["rng/cuda"] = torch.cuda.get_rng_state()
    # the batch order: an in-memory BatchStream (generator state, permutation, position) or a
    # streamed folder (batches consumed): tensors here, numbers in the metadata
    ss = stream.state_dict()
    stream_meta = {}
    for k, v in ss.items():
        if isinstance(v, torch.Tensor):
            t["stream/gen" if k == "generator" else f"stream/{k}"] = v
        elif v is not None:
            stream_meta[k] = v
    # which parameters hold AdamW state: one that never had a gradient holds none, so the tensors
    # alone cannot tell a deleted state from an absent one
    m = {"kind": KIND, "progress": progress, "param_groups": osd["param_groups"], "sched": sched.state_dict(),
         "opt_params": sorted(int(i) for i in osd["state"]), "stream_pos": ss.get("pos"), "stream": stream_meta,
         **meta}
    return save_tensors(path, t, m)


ADVICE = "hand-edited or damaged? start a fresh run in another --out folder"


def damaged(path: str | Path, what: str) -> NsvitError:
    """The one error of a checkpoint that cannot be resumed: the file, what is wrong, what to do."""
    return NsvitError(f"checkpoint {path}: {what} ({ADVICE})")


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def is_whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    return is_real(v) and math.isfinite(v)


def _as_json(v: Any) -> Any:
    """``v`` as the metadata holds it after a save and a load (tuples become lists)."""
    return json.loads(json.dumps(v))


def check_header(path: str | Path, m: dict[str, Any]) -> None:
    """The metadata a finetuning checkpoint must hold, each of its type, before anything reads it:
    kind, config, arch, model_kwargs, progress, history, param_groups, sched, stream (and stream_pos).
    Raises NsvitError (:func:`damaged`) naming the first that is missing or of the wrong type."""
    if m.get("kind") != KIND:
        raise NsvitError(f"{path} is not a finetuning checkpoint of nsvit-fast")
    types = {"config": dict, "arch": str, "model_kwargs": dict, "progress": dict, "history": list,
             "param_groups": list, "sched": dict, "stream": dict}
    for key, typ in types.items():
        if key not in m:
            raise damaged(path, f"metadata {key!r} is missing")
        if not isinstance(m[key], typ):
            raise damaged(path, f"metadata {key!r} must be a JSON {'object' if typ is dict else typ.__name__}, "
                                f"got {_short(m[key])}")
    if m.get("stream_pos") is not None and not is_whole(m["stream_pos"]):
        raise damaged(path, f"metadata 'stream_pos' must be a whole number, got {_short(m['stream_pos'])}")


def _check_weights(path, t: dict[str, torch.Tensor], prefix: str, own: dict[str, torch.Tensor], what: str) -> None:
    """``t``'s ``prefix`` tensors are exactly ``own``'s keys, of its shapes and dtypes, and finite."""
    got = {k[len(prefix):] for k in t if k.startswith(prefix)}
    missing = [k for k in own if k not in got]
    if missing:
        raise damaged(path, f"{what} lacks {len(missing)} tensor(s), e.g. {prefix}{missing[0]}")
    extra = sorted(got - set(own))
    if extra:
        raise damaged(path, f"unexpected tensor {prefix + extra[0]!r}")
    for k, ref in own.items():
        _check_tensor(path, f"{prefix}{k}", t[f"{prefix}{k}"], tuple(ref.shape), ref.dtype)


def _check_tensor(path, name: str, v: torch.Tensor, shape: tuple | None, dtype: torch.dtype | None,
                  min_value: float | None = None) -> None:
    if dtype is not None and v.dtype != dtype:
        raise damaged(path, f"tensor {name!r} is {str(v.dtype).replace('torch.', '')}, expected "
                            f"{str(dtype).replace('torch.', '')}")
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise damaged(path, f"tensor {name!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
    if v.is_floating_point():
        if v.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise damaged(path, f"tensor {name!r} is {str(v.dtype).replace('torch.', '')}")
        if not bool(torch.isfinite(v).all()):
            raise damaged(path, f"tensor {name!r} holds {int((~torch.isfinite(v)).sum())} NaN or inf value(s)")
        if min_value is not None and v.numel() and float(v.min()) < min_value:
            raise damaged(path, f"tensor {name!r} holds values below {min_value:g}")


def _check_generator(path, name: str, v: torch.Tensor, ref: torch.Tensor) -> None:
    """A CPU generator state: ``ref``'s dtype and size, and one torch accepts (set on a throwaway generator)."""
    _check_tensor(path, name, v, tuple(ref.shape), ref.dtype)
    try:
        torch.Generator().set_state(v)
    except (RuntimeError, TypeError, ValueError) as e:
        raise damaged(path, f"tensor {name!r} is not a random generator state ({str(e).splitlines()[0]})") from None


def _check_group_keys(path, where: str, saved: dict, fresh: dict, skip: tuple[str, ...]) -> None:
    """``saved`` holds no key ``fresh`` lacks and every key whose fresh value is not a flag (bools and
    None, which torch fills in for a file of an older torch), with the fresh values except ``skip``."""
    extra = [k for k in saved if k not in fresh]
    if extra:
        raise damaged(path, f"{where} has an unknown key {extra[0]!r}")
    missing = [k for k, v in fresh.items() if k not in saved and not (v is None or isinstance(v, bool))]
    if missing:
        raise damaged(path, f"{where} lacks {missing[0]!r}")
    for k, v in fresh.items():
        if k in saved and k not in skip and saved[k] != v:
            raise damaged(path, f"{where} {k!r} is {_short(saved[k])}, this run's is {_short(v)}")


def check_state(path: str | Path, t: dict[str, torch.Tensor], m: dict[str, Any], *, parts, opt, sched, ema,
                stream, steps_done: int, scaled: bool = False) -> None:
    """Check the whole checkpoint (``t``, ``m`` from :func:`nsvit_fast.io.load_tensors`, its header
    checked by :func:`check_header`) against this run's fresh objects, changing none of them: the
    tensor names, the model and EMA weights, AdamW's state and param_groups, the cosine schedule,
    the RNG states and the batch stream, for a run ``steps_done`` model steps in (``scaled``: an
    fp16 GradScaler may have skipped optimiser steps). :func:`load_state` of a checked state cannot
    fail half-way. Raises NsvitError (:func:`damaged`) naming the first problem."""
    # the tensor names: every one has its place
    known = ("model/", "ema/", "opt/", "run/")
    for k in t:
        if not (k.startswith(known) or k in ("rng/torch", "rng/cuda", "stream/gen", "stream/perm")):
            raise damaged(path, f"unexpected tensor {k!r}")
    if ema is None and any(k.startswith("ema/") for k in t):
        raise damaged(path, f"holds EMA weights ({next(k for k in t if k.startswith('ema/'))!r}) for a run without ema")
    _check_weights(path, t, "model/", parts.weights(), "the model's weights")
    if ema is not None:
        _check_weights(path, t, "ema/", ema.module.state_dict(), "the EMA weights")
    for k in t:
        if k.startswith("run/"):
            _check_tensor(path, k, t[k], None, None)
            if not t[k].is_floating_point():
                raise damaged(path, f"tensor {k!r} is {str(t[k].dtype).replace('torch.', '')}, expected a float tensor")

    # AdamW: param_groups as this optimiser's (its hyperparameters from the config), a finite lr
    fresh_osd = opt.state_dict()
    groups, fresh_groups = m["param_groups"], _as_json(fresh_osd["param_groups"])
    if len(groups) != len(fresh_groups):
        raise damaged(path, f"'param_groups' holds {len(groups)} group(s), this optimiser {len(fresh_groups)}")
    for i, (g, f) in enumerate(zip(groups, fresh_groups)):
        where = f"param_groups[{i}]"
        if not isinstance(g, dict):
            raise damaged(path, f"{where} must be a JSON object, got {_short(g)}")
        _check_group_keys(path, where, g, f, skip=("lr",))
        lr, top = g["lr"], f.get("initial_lr", f["lr"])
        if not is_finite(lr) or not 0 <= lr <= top * (1 + 1e-6):
            raise damaged(path, f"{where} 'lr' must be a finite number in [0, {top:g}], got {_short(lr)}")
    params = [p for g in opt.param_groups for p in g["params"]]
    amsgrad = any(g.get("amsgrad") for g in groups)
    expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    state: dict[int, set[str]] = {}
    for k in t:
        if not k.startswith("opt/"):
            continue
        idx, _, key = k[4:].partition("/")
        if not (idx.isdigit() and str(int(idx)) == idx and int(idx) < len(params)) or key not in expected:
            raise damaged(path, f"unexpected optimiser tensor {k!r} (this optimiser has parameters 0.."
                                f"{len(params) - 1}, each with {', '.join(sorted(expected))})")
        i, v = int(idx), t[k]
        state.setdefault(i, set()).add(key)
        if key == "step":
            _check_tensor(path, k, v, (), None)
            if not v.is_floating_point() and v.dtype not in (torch.int64, torch.int32):
                raise damaged(path, f"tensor {k!r} is {str(v.dtype).replace('torch.', '')}, expected a number")
            n = float(v)
            if not (n == int(n) and 1 <= n <= steps_done):
                raise damaged(path, f"tensor {k!r} is {n:g}, not a step count in 1..{steps_done} "
                                    f"(the run is {steps_done} step(s) in)")
        else:
            _check_tensor(path, k, v, tuple(params[i].shape), params[i].dtype,
                          min_value=0.0 if key != "exp_avg" else None)
    for i, keys in sorted(state.items()):
        if keys != expected:
            raise damaged(path, f"the optimiser state of parameter {i} lacks {sorted(expected - keys)[0]!r}")
    if steps_done and not state and not scaled:
        raise damaged(path, f"holds no optimiser state, yet the run is {steps_done} step(s) in")
    listed = m.get("opt_params")  # absent in checkpoints written before it was recorded
    if listed is not None:
        if not (isinstance(listed, list) and all(is_whole(i) for i in listed)):
            raise damaged(path, f"metadata 'opt_params' must be a list of parameter indices, got {_short(listed)}")
        lost = sorted(set(listed) - set(state))
        if lost:
            raise damaged(path, f"the optimiser state of parameter {lost[0]} is missing "
                                f"({len(lost)} of {len(listed)} listed in 'opt_params')")
        unlisted = sorted(set(state) - set(listed))
        if unlisted:
            raise damaged(path, f"the optimiser state of parameter {unlisted[0]} is not listed in 'opt_params'")

    # the cosine schedule: this run's T_max and base lrs, as many steps taken as the progress says
    sd, fresh = m["sched"], _as_json(sched.state_dict())
    _check_group_keys(path, "'sched'", sd, fresh, skip=("last_epoch", "_step_count", "_last_lr"))
    if "last_epoch" in fresh and (not is_whole(sd["last_epoch"]) or sd["last_epoch"] != steps_done):
        raise damaged(path, f"'sched' last_epoch is {_short(sd['last_epoch'])}, but the run is {steps_done} "
                            f"step(s) in")
    if "_step_count" in fresh and (not is_whole(sd["_step_count"]) or sd["_step_count"] != steps_done + 1):
        raise damaged(path, f"'sched' _step_count is {_short(sd['_step_count'])}, expected {steps_done + 1}")
    if "_last_lr" in fresh and (not isinstance(sd["_last_lr"], list) or not all(map(is_real, sd["_last_lr"]))
                                or sd["_last_lr"] != [g["lr"] for g in groups]):
        raise damaged(path, f"'sched' _last_lr {_short(sd['_last_lr'])} is not the param_groups' lr")

    # random generators
    if "rng/torch" not in t:
        raise damaged(path, "tensor 'rng/torch' (the random generator's state) is missing")
    _check_generator(path, "rng/torch", t["rng/torch"], torch.get_rng_state())
    if "rng/cuda" in t:
        ref = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        _check_tensor(path, "rng/cuda", t["rng/cuda"], None if ref is None else tuple(ref.shape), torch.uint8)

    # the batch stream: an in-memory BatchStream or a streamed folder
    mine = stream.state_dict()
    if "generator" in mine:
        bs = stream.stream
        if "stream/gen" not in t:
            raise damaged(path, "holds no in-memory batch order (tensor 'stream/gen'), yet this run's data is "
                                "in memory")
        _check_generator(path, "stream/gen", t["stream/gen"], mine["generator"])
        pos, perm = m.get("stream_pos"), t.get("stream/perm")
        if pos is None:
            raise damaged(path, "metadata 'stream_pos' is missing")
        if "pos" in m["stream"] and m["stream"]["pos"] != pos:
            raise damaged(path, f"metadata 'stream' pos {_short(m['stream']['pos'])} is not 'stream_pos' {pos}")
        if perm is None:
            if pos != 0 or steps_done:
                raise damaged(path, "tensor 'stream/perm' (the batch order) is missing")
        else:
            _check_tensor(path, "stream/perm", perm, (bs.n,), torch.int64)
            if not torch.equal(perm.sort().values, torch.arange(bs.n)):
                raise damaged(path, f"tensor 'stream/perm' is not a permutation of the {bs.n} training images")
            if not (bs.b <= pos <= bs.n and pos % bs.b == 0):
                raise damaged(path, f"'stream_pos' {pos} is not a batch boundary in {bs.b}..{bs.n} (batches of "
                                    f"{bs.b} from {bs.n} images)")
    else:
        if "stream/gen" in t or "stream/perm" in t:
            raise damaged(path, "holds the batch order of in-memory data, yet this run streams a folder")
        ss = m["stream"]
        if not is_whole(ss.get("consumed")):
            raise damaged(path, f"metadata 'stream' consumed must be a whole number, got {_short(ss.get('consumed'))}")
        if ss["consumed"] != steps_done:
            raise damaged(path, f"metadata 'stream' consumed is {ss['consumed']}, but the run is {steps_done} "
                                f"step(s) in")
        if "n" in ss and is_whole(ss["n"]) and ss["n"] != mine["n"]:  # not a damaged file: the folder changed
            raise NsvitError(f"checkpoint {path}: the run streamed {ss['n']} images, the training folder now holds "
                             f"{mine['n']}; a resume needs the folder as it was (or start a fresh run in another "
                             f"--out folder)")
        for key in ("seed", "n", "batch_size"):
            if key in ss and (not is_whole(ss[key]) or ss[key] != mine[key]):
                raise damaged(path, f"metadata 'stream' {key} is {_short(ss[key])}, this data's is {mine[key]} "
                                    f"(another folder or setting?)")


def load_state(path: str | Path, *, parts, opt, sched, ema, stream,
               loaded: tuple[dict[str, torch.Tensor], dict] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore everything into the given objects; returns (the run's own tensors, metadata).
    ``loaded``: the file's (tensors, metadata) already read (and checked by :func:`check_state`)."""
    t, m = loaded if loaded is not None else load_tensors(path)
    if m.get("kind") != KIND:
        raise NsvitError(f"{path} is not a finetuning checkpoint of nsvit-fast")
    parts.load_weights({k[6:]: v for k, v in t.items() if k.startswith("model/")}, str(path))
    if ema is not None:
        ema.module.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema/")})
    state: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("opt/"):
            _, i, key = k.split("/", 2)
            state.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})
    sched.load_state_dict(m["sched"])
    torch.set_rng_state(t["rng/torch"])
    if "rng/cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng/cuda"])
    if "stream/gen" in t:  # an in-memory BatchStream
        stream.load_state_dict({"generator": t["stream/gen"], "perm": t.get("stream/perm"), "pos": m["stream_pos"]})
    else:                  # a streamed folder
        stream.load_state_dict(dict(m.get("stream", {})))
    return {k[4:]: v for k, v in t.items() if k.startswith("run/")}, m

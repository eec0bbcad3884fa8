"""The whole state of a finetuning run in one safetensors file, written atomically.

Tensors: model weights (``model/...``), EMA weights (``ema/...``), AdamW state (``opt/<i>/<key>``),
the round's noise, the torch RNG state and the batch stream (generator state, permutation).
JSON metadata: round and step, scheduler and optimiser hyperparameters, the history of finished
rounds, the config and the model's identity. One file means a kill at any moment leaves either
the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

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
    m = {"kind": KIND, "progress": progress, "param_groups": osd["param_groups"], "sched": sched.state_dict(),
         "stream_pos": ss.get("pos"), "stream": stream_meta, **meta}
    return save_tensors(path, t, m)


def load_state(path: str | Path, *, parts, opt, sched, ema, stream) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore everything into the given objects; returns (the run's own tensors, metadata)."""
    t, m = load_tensors(path)
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

"""Where synthesis time goes: a few descent steps under torch.profiler, summed by phase, and a
Chrome trace.

The engine labels its phases with ``torch.profiler.record_function``: data (batch indices and the
gather of cached clean tokens), clean_forward (patch embedding + clean logits: every step in the
reference mode, once per image in the fast mode), noisy_forward, backward, loss_and_stop (loss,
MSE-prob, stop flags), optimizer, host_sync (reading values on the host). Only the descent loop is
profiled; setup and the final held-out metrics are not.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from ..config import build
from ..errors import NsvitError
from ..io import atomic_path
from ..models.registry import adapt
from .engine import (SynthConfig, SynthLog, check_config, check_finite_noise, descend, frozen, image_tensor,
                     initial_noises)

PHASES = ("data", "clean_forward", "noisy_forward", "backward", "loss_and_stop", "optimizer", "host_sync")


def profile_synth(model, data, steps: int = 20, trace: str | Path | None = "synth_trace.json",
                  **synth_kwargs) -> dict:
    """Run ``steps`` descent steps (eps forced tiny so nothing stops) under the profiler.

    Returns {"phases": {phase: {"ms", "pct", "calls"}}, "wall_ms", "ms_per_step", "steps", "mode"} and writes
    the Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev), atomically.
    Raises NsvitError as :func:`~nsvit_fast.synth.synthesize` does for bad settings or data."""
    fixed = sorted(set(synth_kwargs) & {"eps", "max_steps", "stop", "heldout", "schedule"})
    if fixed:  # eps, max_steps, stop are set below; heldout and schedule act only around the descent profiled
        raise NsvitError(f"profile_synth runs a fixed number of descent steps and takes no {fixed[0]!r}; "
                         f"give steps= instead")
    # kineto's start/stop markers ("USDT:...") are its level 5, above ERROR (4): 6 keeps them off the terminal
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    cfg = check_config(build(SynthConfig, None, {**synth_kwargs, "eps": 1e-12, "max_steps": steps,
                                                 "stop": "batch"}, "synthesis"))
    # eps 0 after the check: the stop test (MSE-prob < eps) never passes, even for a noise that moves
    # nothing (a tiny lim: MSE-prob 0 stopped the descent at its first step, and the steps were reported)
    cfg = dataclasses.replace(cfg, eps=0.0)
    parts = adapt(model)
    parts.check_learnable("noise synthesis")
    device = next(parts.parameters()).device
    images = image_tensor(data, parts)
    v0 = initial_noises(parts, cfg, None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with frozen(parts, freeze=cfg.mode == "fast"), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        V, taken = descend(parts, images, v0, cfg, device, None, SynthLog(None, steps, False, ""))[:2]
        wall = (time.perf_counter() - t0) * 1e3
    check_finite_noise(V, cfg)  # a diverged noise's steps time NaN arithmetic, not synthesis
    if int(taken.max()) != steps:  # the times below are per step: they must be of the steps run
        raise NsvitError(f"the profiled descent took {int(taken.max())} of {steps} steps")
    totals, calls = {p: 0.0 for p in PHASES}, {p: 0 for p in PHASES}
    for ev in prof.key_averages():
        if ev.key in totals:
            totals[ev.key] += ev.cpu_time_total / 1e3  # a label's time includes its children's
            calls[ev.key] += ev.count
    loop = sum(totals.values()) or 1.0
    out = {"steps": steps, "mode": cfg.mode, "wall_ms": round(wall, 1), "ms_per_step": round(wall / steps, 2),
           "phases": {p: {"ms": round(v, 2), "pct": round(100 * v / loop, 1), "calls": calls[p]}
                      for p, v in totals.items()}}
    if trace:
        with atomic_path(trace) as tmp:
            prof.export_chrome_trace(str(tmp))
        out["trace"] = str(trace)
    return out

"""Finetuning engine: every method trains, ns uses the fused 2B batch, resume after kill -9 ends
in the same weights, torchrun on 2 CPU processes matches one process, bad input is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from nsvit_fast import NsvitError, digits, load_model
from nsvit_fast.io import load_tensors
from nsvit_fast.models import embedded
from nsvit_fast.train import METHODS, finetune
from nsvit_fast.train.methods import fused_views

FAST_SYNTH = {"lim": 3.0, "max_steps": 200, "batch_size": 64, "heldout": 64}


@pytest.fixture(scope="module")
def train():
    return digits("train").subset(512)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_runs_a_round_and_changes_the_weights(method, train, tmp_path):
    parts = load_model("digits_vit")
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    res = finetune(parts, train, method=method, rounds=1, model_steps=2, lr=1e-4, batch_size=32,
                   synth=FAST_SYNTH, val_data=digits("val"), out_dir=tmp_path, progress=False)
    after = parts.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    h = res.history[0]
    assert h["round"] == 0 and 0 < h["val_acc"] <= 1 and h["train_loss"] > 0
    if method in ("ns", "random"):
        assert h["noise_norm"] > 0 and (method == "random" or h["converged"])
    for f in ("model.safetensors", "checkpoint.safetensors", "log.jsonl", "fig4_trend.png", "config.json"):
        assert (tmp_path / f).is_file()
    again = load_model(checkpoint=tmp_path / "model.safetensors")
    assert torch.equal(again.model.head.weight, parts.model.head.weight)


def test_ns_uses_one_fused_2b_batch(monkeypatch):
    parts = load_model("digits_vit")
    x, y = digits("train").images[:16], digits("train").labels[:16]
    v = torch.randn(16, 96)
    import nsvit_fast.ops as ops

    seen = {"patch_embed": [], "assembled_rows": []}
    pe, ta = type(parts).patch_embed, ops.token_assembly

    def assembly(*a, **kw):
        out = ta(*a, **kw)
        seen["assembled_rows"].append(out[0].shape[0])
        return out

    monkeypatch.setattr(type(parts), "patch_embed", lambda s, t: seen["patch_embed"].append(t.shape[0]) or pe(s, t))
    monkeypatch.setattr(ops, "token_assembly", assembly)
    loss, _ = METHODS["ns"]().loss(parts, x, y, v)
    # one patch embedding of B images, one token assembly of 2B rows (clean + noisy) for one encoder pass
    assert seen == {"patch_embed": [16], "assembled_rows": [32]}
    monkeypatch.undo()
    # and it is the same loss, with the same gradient, as the official two forwards
    g_fused = torch.autograd.grad(loss, list(parts.parameters()))
    u1, u2 = parts.patch_embed(x), parts.patch_embed(x)
    loss2 = F.cross_entropy(parts.encode(u1), y) + F.cross_entropy(parts.encode(u2 + v), y)
    g_two = torch.autograd.grad(loss2, list(parts.parameters()))
    assert torch.allclose(loss, loss2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_fused, g_two))
    z, zn = fused_views(parts, x, v)
    assert torch.allclose(zn, parts.encode(parts.patch_embed(x) + v), atol=1e-5)


def test_warm_start_scales_the_previous_noise(train, monkeypatch):
    import nsvit_fast.train.engine as eng

    inits = []
    real = eng.synthesize

    def spy(*a, init=None, **kw):
        inits.append(None if init is None else init.clone())
        return real(*a, init=init, **kw)

    monkeypatch.setattr(eng, "synthesize", spy)
    res = finetune(load_model("digits_vit"), train, rounds=3, model_steps=1, batch_size=32, lr=1e-4,
                   noise_init="warm", warm_growth=1.25, synth=FAST_SYNTH, progress=False)
    assert inits[0] is None and inits[1] is not None and inits[2] is not None
    assert inits[1].norm().item() == pytest.approx(1.25 * res.history[0]["noise_norm"], rel=1e-4)


def test_ema_and_tensorboard(train, tmp_path):
    parts = load_model("digits_vit")
    res = finetune(parts, train, method="plain", rounds=2, model_steps=3, lr=1e-3, batch_size=32, ema=0.5,
                   tensorboard=True, out_dir=tmp_path, progress=False)
    ema = load_model(checkpoint=tmp_path / "model_ema.safetensors")
    assert not torch.equal(ema.model.head.weight, parts.model.head.weight)
    assert res.eval_parts is not parts
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _run_cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "nsvit_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


RESUME_ARGS = ["finetune", "--config", "digits", "--quiet", "rounds=3", "model_steps=4", "batch_size=32",
               "checkpoint_every=2", "noise_init=warm", "synth.lim=3", "synth.lim_unit=abs", "synth.max_steps=200",
               "synth.batch_size=64", "synth.heldout=64", "val_data=null", "max_images=256"]


def test_resume_after_kill_ends_in_the_same_weights(tmp_path):
    ref = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "ref"))
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    run = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    t0 = time.time()
    while not ckpt.exists() and run.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the run, after the first checkpoint
    assert run.poll() is None, "the run finished before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    progress = load_tensors(ckpt)[1]["progress"]
    assert (progress["round"], progress["step"]) < (3, 0)
    # without --resume the folder is protected
    again = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "run"))
    assert again.wait(timeout=300) == 2 and "resume" in again.stderr.read()
    res = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "run"), "--resume")
    assert res.wait(timeout=600) == 0, res.stderr.read()
    a, _ = load_tensors(tmp_path / "ref" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1, 2]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = ["finetune", "--config", "digits", "--quiet", "rounds=2", "model_steps=3", "batch_size=32",
            "synth.lim=3", "synth.lim_unit=abs", "synth.max_steps=200", "synth.batch_size=64", "synth.heldout=64",
            "val_data=null", "max_images=256"]
    one = _run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.wait(timeout=600) == 0, one.stderr.read()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "nsvit_fast", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    # same batches, averaged gradients: the same noise search (steps) and nearly the same weights;
    # only the order of float reductions differs
    assert [h["synth_steps"] for h in h1] == [h["synth_steps"] for h in h2]
    assert [h["noise_norm"] for h in h1] == pytest.approx([h["noise_norm"] for h in h2], rel=1e-4)
    a, _ = load_tensors(tmp_path / "one" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "two" / "model.safetensors")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Adam turns a round-off difference in a near-zero gradient element into a step of up to ~lr
    # (1e-4 here), so the bound is lr per step (6 steps); almost every weight agrees far closer
    assert float(diff.max()) <= 6 * 1e-4
    assert float(diff.mean()) < 1e-6


@pytest.mark.parametrize("kw,msg", [
    (dict(method="magic"), "unknown method 'magic'"), (dict(rounds=0), "rounds must be"),
    (dict(roundz=3), "did you mean 'rounds'"), (dict(synth={"epz": 1}), "did you mean 'eps'"),
    (dict(noise_init="hot"), "noise_init"), (dict(**{"synth.eps": -1}), "eps must be"),
])
def test_bad_config(train, kw, msg):
    with pytest.raises(NsvitError, match=msg):
        finetune(load_model("digits_vit"), train, progress=False, **kw)


def test_checkpoint_from_another_run_is_refused(train, tmp_path):
    finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=1, batch_size=32,
             out_dir=tmp_path, progress=False)
    with pytest.raises(NsvitError, match="another run"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=1, batch_size=32,
                 out_dir=tmp_path, progress=False)
    with pytest.raises(NsvitError, match="belongs to another run.*lr"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=1, batch_size=32,
                 lr=1.0, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(NsvitError, match="belongs to another run.*model"):
        finetune(load_model(embedded.ARCH, **{**embedded.KWARGS, "depth": 4}),
                 train, method="plain", rounds=1, model_steps=1, batch_size=32, out_dir=tmp_path, resume=True,
                 progress=False)

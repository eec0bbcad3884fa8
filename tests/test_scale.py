"""The paper's workload on any device and precision: bf16 against fp32, torch.compile, streamed
ImageFolder trees through synthesis and finetuning (resume after kill -9, torchrun), device errors."""

import json
from pathlib import Path
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model
from nsvit_fast.io import load_tensors
from nsvit_fast.synth import synthesize
from nsvit_fast.train import finetune

from helpers import TORCHRUN2, write_digits_folder


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """The first 320 digits training images as PNG files in ImageFolder layout (real data, lossless)."""
    return write_digits_folder(tmp_path_factory.mktemp("digit_folder"), "train", 320)


@pytest.fixture(scope="module")
def digit_jpeg_folder(tmp_path_factory):
    """The same 320 digits as JPEG files (PIL, quality 90, fixed): the lossy format of ImageNet's
    folders, decoded by the same loader."""
    return write_digits_folder(tmp_path_factory.mktemp("digit_jpeg_folder"), "train", 320, ".JPEG",
                               format="JPEG", quality=90)


def test_bf16_synthesis_reaches_eps_close_to_fp32(digits_parts):
    """bf16 autocast of the model's forwards: the noise still passes the stop rule, and its held-out
    MSE-prob is within 0.005 of fp32's (the stated tolerance; measured 8e-5 apart on this CPU)."""
    train = digits("train")
    banks = {p: synthesize(digits_parts, train, eps=0.03, lim=3.0, max_steps=300, progress=False, precision=p,
                           device="cpu")
             for p in ("fp32", "bf16")}
    assert all(bool(b.converged.all()) for b in banks.values())
    assert banks["bf16"].meta["precision"] == "bf16"
    assert abs(float(banks["bf16"].mse_prob[0]) - float(banks["fp32"].mse_prob[0])) < 0.005
    assert abs(int(banks["bf16"].steps[0]) - int(banks["fp32"].steps[0])) <= 5
    # the noise and its optimiser stay fp32 whatever the model's precision
    assert banks["bf16"].noises.dtype == torch.float32
    assert not torch.equal(banks["bf16"].noises, banks["fp32"].noises)  # bf16 really ran


def test_bf16_finetune_within_one_point_of_fp32():
    train, test = digits("train"), digits("test")
    acc = {}
    for prec in ("fp32", "bf16"):
        parts = load_model("digits_vit")
        finetune(parts, train, method="ns", rounds=1, model_steps=10, lr=1e-4, batch_size=64, noise_init="fresh",
                 synth={"lim": 3.0, "max_steps": 300}, precision=prec, progress=False, device="cpu")
        with torch.no_grad():
            acc[prec] = float((parts(test.images).argmax(-1) == test.labels).float().mean())
    assert acc["fp32"] > 0.95
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.01, acc


@pytest.mark.slow
def test_compile_gives_the_same_losses():
    train = digits("train")
    hist = {}
    for comp in (False, True):
        torch._dynamo.reset()
        parts = load_model("digits_vit")
        res = finetune(parts, train, method="plain", rounds=1, model_steps=3, batch_size=32, lr=1e-4, compile=comp,
                       progress=False, device="cpu")
        hist[comp] = res.history[-1]["train_loss"]
    assert hist[True] == pytest.approx(hist[False], abs=1e-4)


def test_streamed_synthesis_and_finetune_on_a_folder(digits_parts, digit_folder, tmp_path):
    from nsvit_fast.data.stream import StreamingData

    data = StreamingData(digit_folder, digits_parts, batch_size=64, seed=0, augment="none", workers=1)
    bank = synthesize(digits_parts, data, eps=0.03, lim=3.0, max_steps=300, heldout=64, progress=False)
    assert bool(bank.converged.all()) and bank.meta["train_images"] == 320 and bank.meta["heldout_images"] == 64
    assert data.consumed == int(bank.steps[0]) + 1  # one streamed batch per check, nothing read twice
    parts = load_model("digits_vit")
    res = finetune(parts, digit_folder, method="ns", rounds=1, model_steps=3, batch_size=32, workers=1,
                   synth={"lim": 3.0, "max_steps": 20, "batch_size": 32, "heldout": 32}, val_data=digit_folder,
                   val_images=64, progress=False, out_dir=tmp_path / "run", device="cpu")
    h = res.history[-1]
    assert h["synth_steps"] >= 1 and 0 <= h["val_acc"] <= 1 and h["train_loss"] > 0
    assert load_tensors(tmp_path / "run" / "checkpoint.safetensors")[1]["stream"]["consumed"] == 3


def test_a_bad_val_image_stops_the_run_before_round_0(digit_folder, tmp_path, monkeypatch):
    """The val folder is read once before round 0 (the starting model's accuracy), so an unreadable
    val image stops the run before any noise is learned or step taken, not after round 0."""
    import nsvit_fast.train.engine as eng

    val = tmp_path / "val"
    shutil.copytree(digit_folder, val)
    (val / "digit3" / "broken.png").write_bytes(b"not a png")
    calls = []
    monkeypatch.setattr(eng, "synthesize", lambda *a, **kw: calls.append(1))
    with pytest.raises(NsvitError, match="broken.png is not a readable image"):
        finetune(load_model("digits_vit"), digit_folder, method="ns", rounds=1, model_steps=2, batch_size=32,
                 workers=0, val_data=val, progress=False, out_dir=tmp_path / "run", device="cpu")
    assert calls == [] and not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_a_streamed_folder_is_carved_as_memory_is(digits_parts, digit_folder):
    """stop=heldout on a streamed folder: heldout images chosen by the seed are set aside (read
    through the eval transform), the descent streams only the rest, and the bank's metrics are
    theirs. It was refused before (nothing set apart), and schedule=boundary (which confirms with
    stop=heldout) confirmed on training images."""
    import warnings

    from nsvit_fast.data import load_data
    from nsvit_fast.data.stream import StreamingData
    from nsvit_fast.synth import CleanCache, noise_effect

    data = StreamingData(digit_folder, digits_parts, batch_size=32, seed=0, augment="none")
    rest, held = data.carve(64, seed=5)
    assert len(rest) == 256 and len(held) == 64 and len(data) == 320
    every = load_data(digit_folder, parts=digits_parts)  # the folder in memory, in the same (sorted) order
    files = [p for p, _ in data.dataset.samples]
    kept = [files.index(p) for p, _ in rest.dataset.samples]
    held_idx = sorted(set(range(320)) - set(kept))
    assert len(held_idx) == 64 and torch.equal(held.images, every.images[held_idx])
    assert torch.equal(held.labels, every.labels[held_idx])
    sampler = iter(rest._loader().batch_sampler)
    served = {kept[i] for _ in range(8) for i, _seed in next(sampler)}  # one epoch: 8 batches of 32
    assert served == set(kept)                                          # the held-out images never
    again, _ = data.carve(64, seed=5)
    assert again.dataset.samples == rest.dataset.samples
    assert data.carve(64, seed=6)[0].dataset.samples != rest.dataset.samples  # seeded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged, and no warning of in-sample confirmation
        bank = synthesize(digits_parts, data, eps=0.03, lim=3.0, max_steps=300, heldout=64, seed=5,
                          stop="heldout", progress=False)
    assert bank.meta["heldout_source"] == "carved" and bank.meta["train_images"] == 256
    mse = noise_effect(digits_parts, bank.noises, CleanCache(digits_parts, held.images))[0]
    assert float(mse[0]) == pytest.approx(float(bank.mse_prob[0]), rel=1e-5) and float(mse[0]) < 0.03
    assert data.consumed == 0  # the caller's stream is not read: the carved copy is
    tiny = StreamingData(digit_folder, digits_parts, batch_size=32)
    with pytest.raises(NsvitError, match=r"320 image\(s\) cannot hold 0 out"):
        tiny.carve(0, seed=0)


def test_a_carved_streams_skipped_files_stay_on_their_side(digits_parts, tmp_path):
    """on_bad_image: skip replaces an unreadable file by the next readable one: after carving, the
    next one of its own side. A corrupt training file whose folder neighbour was held out had
    trained on it, and a corrupt held-out file had been measured as a training image."""
    from nsvit_fast.data.stream import StreamingData

    root = write_digits_folder(tmp_path, "train", 16)
    data = StreamingData(root, digits_parts, batch_size=4, seed=0, augment="none", on_bad_image="skip")
    files = [Path(p) for p, _ in data.dataset.samples]
    rest, held = data.carve(4, seed=3)
    kept = {Path(p) for p, _ in rest.dataset.samples}
    # corrupt a held-out file and a kept file just before a held-out one in folder order
    bad_held = next(f for f in files if f not in kept)
    bad_kept = next(f for i, f in enumerate(files[:-1]) if f in kept and files[i + 1] not in kept)
    clean_held = held
    for f in (bad_held, bad_kept):
        f.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="1 unreadable held-out image"):
        rest, held = data.carve(4, seed=3)
    assert {Path(p) for p, _ in rest.dataset.samples} == kept  # the same split
    # every held-out image is one of the clean held-out images (none from the training side)
    assert all(any(torch.equal(x, c) for c in clean_held.images) for x in held.images)
    seen = torch.cat([rest.next()[0] for _ in range(3)])  # one epoch of the 12 kept files
    assert not any(torch.equal(x, c) for x in seen for c in clean_held.images)


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nsvit_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _stream_args(folder, **over):
    kv = {"rounds": 3, "model_steps": 4, "batch_size": 16, "checkpoint_every": 2, "synth.lim": 3,
          "synth.lim_unit": "abs", "synth.max_steps": 30, "synth.batch_size": 32, "synth.heldout": 32,
          "val_data": "null", **over}
    return ["finetune", "--config", "digits", "--quiet", "--data", str(folder), "--device", "cpu", "--workers", "1",
            *(f"{k}={v}" for k, v in kv.items())]


def test_streamed_resume_after_kill_ends_in_the_same_weights(digit_jpeg_folder, tmp_path):
    """A streamed JPEG folder with the official augmentation, one worker: kill -9 after a checkpoint,
    --resume, and the weights equal an uninterrupted run's bit for bit."""
    assert {p.suffix for p in digit_jpeg_folder.rglob("*.*")} == {".JPEG"}
    args = _stream_args(digit_jpeg_folder)
    ref = _cli(*args, "--out", str(tmp_path / "ref"))  # side by side with the run to kill, one thread each
    run = _cli(*args, "--out", str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    t0 = time.time()
    while not ckpt.exists() and run.poll() is None and time.time() - t0 < 600:
        time.sleep(0.05)
    time.sleep(0.3)
    assert run.poll() is None, "the run finished before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert ref.wait(timeout=900) == 0, ref.stderr.read()
    meta = load_tensors(ckpt)[1]
    assert (meta["progress"]["round"], meta["progress"]["step"]) < (3, 0) and "consumed" in meta["stream"]
    # one image added to the folder meanwhile: said so (it read as a damaged checkpoint), nothing changed
    extra = next(digit_jpeg_folder.rglob("*.JPEG"))
    added = extra.with_name("zz_added.JPEG")
    shutil.copy(extra, added)
    try:
        again = _cli(*args, "--out", str(tmp_path / "run"), "--resume")
        assert again.wait(timeout=900) == 2
        err = again.stderr.read().strip().splitlines()
        assert len(err) == 1 and "the training folder now holds" in err[0], err
    finally:
        added.unlink()
    res = _cli(*args, "--out", str(tmp_path / "run"), "--resume")
    assert res.wait(timeout=900) == 0, res.stderr.read()
    a, _ = load_tensors(tmp_path / "ref" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_on_a_streamed_folder_matches_one_process(digit_folder, tmp_path):
    args = _stream_args(digit_folder, rounds=2, model_steps=3, checkpoint_every=0)
    one = _cli(*args, "--out", str(tmp_path / "one"))
    assert one.wait(timeout=900) == 0, one.stderr.read()
    two = subprocess.run([*TORCHRUN2, "-m", "nsvit_fast", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [h["synth_steps"] for h in h1] == [h["synth_steps"] for h in h2]
    assert [h["noise_norm"] for h in h1] == pytest.approx([h["noise_norm"] for h in h2], rel=1e-4)
    a, _ = load_tensors(tmp_path / "one" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "two" / "model.safetensors")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diff.max()) <= 6 * 1e-4 and float(diff.mean()) < 1e-6


_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.parametrize("script,flag,stem", [("bench_synth", "--precision", "synth-bf16"),
                                              ("bench_finetune", "--precision", "finetune-bf16"),
                                              ("bench_precision", "--precisions", "precision")])
def test_bench_scripts_take_device_and_precision(script, flag, stem, tmp_path):
    """Each benchmark runs a tiny bf16 configuration on the CPU and writes only under OUT/cpu/ (never
    the committed results), and refuses CUDA where there is none with one line and exit 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(_BENCH), os.environ.get("PYTHONPATH", "")])}
    run = lambda *a: subprocess.run([sys.executable, os.path.join(_BENCH, f"{script}.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=600)
    p = run("--device", "cpu", flag, "fp32,bf16" if script == "bench_precision" else "bf16", "--quick",
            "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in (tmp_path / "r").rglob("*")) == ["cpu", f"{stem}.json", f"{stem}.md"]
    res = json.loads((tmp_path / "r" / "cpu" / f"{stem}.json").read_text())
    assert res["device"] == "cpu" and res["quick"] is True
    assert (tmp_path / "r" / "cpu" / f"{stem}.md").read_text().startswith("**Smoke run (`--quick`)")  # not a result
    if script == "bench_precision":
        row = res["results"][0]
        assert row["ns_step_ms_bf16"] > 0 and row["synth_step_ms_fp32"] > 0 and row["ns_step_bf16_over_fp32"] > 0
    elif script == "bench_synth":
        assert res["precision"] == "bf16" and res["results"][0]["fast_ms"] > 0
    else:
        assert res["precision"] == "bf16" and res["fused_ms"] > 0 and res["fresh_synth_steps"] == [2]
    if not torch.cuda.is_available():
        p = run("--device", "cuda", "--out", str(tmp_path / "c"))
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and err[0].startswith(f"{script}.py: error: device 'cuda'"), p.stderr
        assert not (tmp_path / "c").exists()

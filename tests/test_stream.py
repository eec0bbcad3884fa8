"""Streaming ImageFolder data (nsvit_fast.data.stream) and the runtime record (nsvit_fast.runtime)."""

import numpy as np
import pytest
import torch

from nsvit_fast.data.stream import StreamingData, eval_loader, train_transform
from nsvit_fast.errors import NsvitError
from nsvit_fast.runtime import Runtime, exact_math, resolve_device


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """24 real-photo JPEGs (random crops of scikit-image's photos) in 3 class folders, 48-80 px."""
    from PIL import Image
    from skimage import data as skd

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for cls, fn in (("astronaut", skd.astronaut), ("cat", skd.chelsea), ("coffee", skd.coffee)):
        img = fn()
        (root / cls).mkdir()
        for i in range(8):
            s = int(rng.integers(48, 81))
            y0, x0 = int(rng.integers(0, img.shape[0] - s)), int(rng.integers(0, img.shape[1] - s))
            Image.fromarray(img[y0:y0 + s, x0:x0 + s]).save(root / cls / f"{i}.jpg", quality=90)
    return root


def _take(stream, n):
    return [stream.next() for _ in range(n)]


def test_stream_batches_follow_the_seed_not_the_workers(digits_parts, jpeg_folder):
    a = StreamingData(jpeg_folder, digits_parts, batch_size=8, seed=3, workers=0)
    b = StreamingData(jpeg_folder, digits_parts, batch_size=8, seed=3, workers=2)
    c = StreamingData(jpeg_folder, digits_parts, batch_size=8, seed=4, workers=0)
    ba, bb, bc = _take(a, 5), _take(b, 5), _take(c, 5)
    for (xa, ya), (xb, yb) in zip(ba, bb):
        assert xa.shape == (8, 3, 32, 32) and xa.dtype == torch.float32
        assert 0 <= float(xa.min()) and float(xa.max()) <= 1 and float(xa.std()) > 0.05
        assert torch.equal(xa, xb) and torch.equal(ya, yb)   # augmentation seeded per sample, not per worker
    assert not torch.equal(ba[0][0], bc[0][0])                # another seed, other batches / crops
    # augmentation really varies: the same image comes back with another crop in a later epoch
    ids = [tuple(y.tolist()) for _, y in ba]
    assert len(set(ids)) > 1
    b.close()


def test_stream_resume_replays_the_same_batches(digits_parts, jpeg_folder):
    full = StreamingData(jpeg_folder, digits_parts, batch_size=6, seed=0)
    ref = _take(full, 7)
    first = StreamingData(jpeg_folder, digits_parts, batch_size=6, seed=0)
    _take(first, 3)
    state = first.state_dict()
    again = StreamingData(jpeg_folder, digits_parts, batch_size=6, seed=0)
    again.load_state_dict(state)
    for (x, y), (xr, yr) in zip(_take(again, 4), ref[3:]):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    other = StreamingData(jpeg_folder, digits_parts, batch_size=4, seed=0)
    with pytest.raises(NsvitError, match="batch_size"):
        other.load_state_dict(state)


def test_stream_ranks_together_see_one_process(digits_parts, jpeg_folder):
    one = _take(StreamingData(jpeg_folder, digits_parts, batch_size=8, seed=1), 3)
    r0 = _take(StreamingData(jpeg_folder, digits_parts, batch_size=8, seed=1, rank=0, world=2), 3)
    r1 = _take(StreamingData(jpeg_folder, digits_parts, batch_size=8, seed=1, rank=1, world=2), 3)
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_stream_leaves_the_callers_rng_alone(digits_parts, jpeg_folder):
    import random

    torch.manual_seed(123)
    random.seed(7)
    expect, expect_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(7)  # the augmentation seeds Python's random too (timm's transforms draw from it)
    _take(StreamingData(jpeg_folder, digits_parts, batch_size=4, seed=0, workers=0), 2)
    assert torch.equal(torch.rand(3), expect) and random.random() == expect_py


def test_a_streamed_sample_spreads_over_the_folder(digits_parts, jpeg_folder):
    # the first n files would be the first class only: held-out metrics on one class
    sample = StreamingData(jpeg_folder, digits_parts, batch_size=4, seed=0, workers=0).sample(3)
    assert sorted(sample.labels.tolist()) == [0, 1, 2]


def test_a_streamed_fast_run_scans_its_folder_once_and_reads_the_drift_sample_once(digits_parts, tmp_path,
                                                                                   monkeypatch):
    """Each round's synthesis stream used to scan the whole folder again (an ImageNet listing per
    round and rank), and rounds 1 on re-read the same 256-image sample from disk to measure the last
    noise's drift. The run's noises and weights are those of a fresh stream per round."""
    import warnings

    from helpers import write_digits_folder

    from nsvit_fast import load_model, weights_fingerprint
    from nsvit_fast.data import folders, stream
    from nsvit_fast.train import finetune
    from nsvit_fast.train.yamlcfg import load_run

    (tmp_path / "train").mkdir()
    root = write_digits_folder(tmp_path / "train", n=160)
    _, cfg = load_run("digits_fast", {"rounds": 3, "model_steps": 1, "batch_size": 16, "synth.batch_size": 16,
                                      "synth.heldout": 32, "synth.max_steps": 20, "workers": 0, "val_data": None})
    scans, reads = [], []
    real_scan, real_read = folders.image_folder, stream.StreamingData._read
    monkeypatch.setattr(folders, "image_folder", lambda *a, **k: scans.append(a[0]) or real_scan(*a, **k))
    monkeypatch.setattr(stream.StreamingData, "_read", lambda self, view, what: reads.append(what) or
                        real_read(self, view, what))
    parts = load_model("digits_vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = finetune(parts, str(root), cfg, progress=False)
    assert len(scans) == 1 and [h["mse_prob_on"] for h in res.history] == ["carved", "train_sample", "train_sample"]
    # the log says what each round's descent ran with: round 0's boundary schedule, then the paper's
    assert [(h["descent_stop"], h["descent_lr"]) for h in res.history] == [
        ("heldout", pytest.approx(0.6)), ("batch", pytest.approx(0.1)), ("batch", pytest.approx(0.1))]
    assert reads == ["held out 32", "sample 32"], reads  # round 0's carve, then one sample for rounds 1 and 2
    # a new stream per round (the old way) gives the same run
    monkeypatch.setattr(stream.StreamingData, "reseeded", lambda self, b, seed: stream.StreamingData(
        root, parts, b, seed, cfg.augment, 0))
    again = load_model("digits_vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res2 = finetune(again, str(root), cfg, progress=False)
    assert weights_fingerprint(again) == weights_fingerprint(parts)
    assert [h["noise_norm"] for h in res2.history] == [h["noise_norm"] for h in res.history]


def test_eval_loader_and_transforms(digits_parts, jpeg_folder):
    xs, ys = zip(*eval_loader(jpeg_folder, digits_parts, batch_size=10))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (24, 3, 32, 32) and y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    # eval is deterministic; train augmentation is a RandomResizedCrop + flip with the model's interpolation
    x2 = torch.cat([b for b, _ in eval_loader(jpeg_folder, digits_parts, batch_size=7)])
    assert torch.equal(x, x2)
    names = [type(t).__name__ for t in train_transform(digits_parts).transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert "ColorJitter" not in names
    with pytest.raises(NsvitError, match="augment"):
        train_transform(digits_parts, "mixup")


def test_stream_bad_input(digits_parts, tmp_path, jpeg_folder):
    from PIL import Image

    with pytest.raises(NsvitError, match="not found"):
        StreamingData(tmp_path / "missing", digits_parts, batch_size=4)
    with pytest.raises(NsvitError, match="batch_size"):
        StreamingData(jpeg_folder, digits_parts, batch_size=0)
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    for workers in (0, 1):  # in the process, and wrapped by torch in a worker: one line naming the file
        with pytest.raises(NsvitError, match=r"^\S*x\.jpg is not a readable image[^\n]*$"):
            StreamingData(bad, digits_parts, batch_size=1, workers=workers).next()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad / "a" / "y.png")
    skip = StreamingData(bad, digits_parts, batch_size=2, augment="none", on_bad_image="skip")
    x, y = skip.next()
    assert x.shape == (2, 3, 32, 32) and float(x.max()) == 0.0  # the readable image stands in for the bad one
    # a round's reseeded copy reads the same files (no second listing) and counts its own skipped
    # reads: sharing the count, every round's warning gave the run's running total
    again = skip.reseeded(2, 1)
    assert again.dataset.samples is skip.dataset.samples and skip.dataset.skips.value == 1
    again.next()
    assert again.dataset.skips.value == 1 and skip.dataset.skips.value == 1


def test_runtime_device_and_precision():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(NsvitError, match="device must be"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(NsvitError, match="no CUDA"):
            resolve_device("cuda:0")
        with pytest.raises(NsvitError, match="fp16 needs a CUDA"):
            Runtime.create("cpu", "fp16")
    with pytest.raises(NsvitError, match="precision must be"):
        Runtime.create("cpu", "int8")
    rt = Runtime.create("cpu", "bf16")
    lin = torch.nn.Linear(8, 8)
    with rt.autocast():
        assert lin(torch.randn(2, 8)).dtype == torch.bfloat16
    with Runtime.create("cpu", "fp32").autocast():
        assert lin(torch.randn(2, 8)).dtype == torch.float32
    with Runtime.create("cpu", "tf32").matmul_mode():
        assert torch.get_float32_matmul_precision() == "high"
        with exact_math():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"


def test_a_numbered_gpu_is_refused_for_a_run_of_several_ranks(monkeypatch):
    # every rank on cuda:N: NCCL's duplicate-GPU error came as a traceback; refused before CUDA is asked
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(NsvitError, match=r"device 'cuda:1' under WORLD_SIZE=2 is not this rank's GPU "
                                         r"\(LOCAL_RANK=unset\)"):
        resolve_device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(NsvitError, match=r"not this rank's GPU \(LOCAL_RANK=0\)"):
        resolve_device("cuda:1")
    if not torch.cuda.is_available():  # cuda:$LOCAL_RANK is this rank's own GPU: on to the CUDA check
        with pytest.raises(NsvitError, match="no CUDA"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    if not torch.cuda.is_available():
        with pytest.raises(NsvitError, match="no CUDA"):
            resolve_device("cuda:1")

"""Guards on the data, file and resume bookkeeping that nothing else looked at closely: the digits
pixels and splits, numbered class folders, label ranges, per-sample augmentation seeds, atomic
renames, outputs at a data folder's root, and a resume's EMA weights and streamed position. Each
test was written against a one-line bug that the suite let through (mutation review, round 3)."""

import os

import numpy as np
import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of half-pixel-centred bilinear resizing (align_corners=False), written
    from the formula: source x = (i + 0.5) n_in / n_out - 0.5, clamped at the edges."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        x0 = min(int(np.floor(x)), n_in - 1)
        x1 = min(x0 + 1, n_in - 1)
        lam = x - x0
        w[i, x0] += 1 - lam
        w[i, x1] += lam
    return w


def test_digits_pixels_are_the_documented_bilinear_upsampling():
    # align_corners=True moved every pixel slightly; the embedded model still scored above the bar
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0
    w = _bilinear_matrix(8, 32)
    want = np.clip(np.einsum("oi,nij,pj->nop", w, raw, w), 0, 1)
    got = digits("all").images[:, 0].double().numpy()
    assert np.abs(got - want).max() < 1e-6


def test_digits_splits_are_stratified():
    # an unstratified test split passed (only "every label appears" was checked)
    full = torch.bincount(digits("all").labels, minlength=10).double()
    for split, n in (("train", 1200), ("val", 200), ("test", 397)):
        counts = torch.bincount(digits(split).labels, minlength=10).double()
        assert (counts - n * full / full.sum()).abs().max() <= 1.0, (split, counts.tolist())


def test_numbered_folders_past_the_outputs_fall_back_to_position(tmp_path):
    # "0".."10" for 10 outputs were taken as the model's own 10 numbered outputs, without a word
    # about the 11th folder
    from nsvit_fast.data.folders import class_index

    for c in range(11):
        (tmp_path / str(c)).mkdir()
    with pytest.warns(UserWarning, match="11 class folders for a 10-output model"):
        classes, idx = class_index(tmp_path, None, 10)
    assert classes == [str(c) for c in range(11)] and idx == {str(c): c for c in range(11)}


def test_labels_one_past_the_outputs_are_refused():
    # labels 0..10 for 10 outputs passed (max + 1 read as max)
    from nsvit_fast.data import ImageDataset
    from nsvit_fast.data.base import check_labels_fit

    ds = ImageDataset(torch.zeros(11, 3, 8, 8), torch.arange(11))
    with pytest.raises(NsvitError, match="11 classes"):
        check_labels_fit(10, ds, "the data")
    check_labels_fit(11, ds, "the data")


def test_every_sample_of_a_batch_has_its_own_augmentation_seed():
    # a seed without the sample's position gave every image of a batch the same crop and flip
    from nsvit_fast.data.stream import sample_seed

    seeds = {sample_seed(0, b, p) for b in range(3) for p in range(8)}
    assert len(seeds) == 24
    assert sample_seed(0, 1, 2) != sample_seed(1, 1, 2)


def test_a_commit_is_a_rename_not_a_copy(tmp_path):
    # copy + unlink: a reader holding the file saw it change under it, and a kill between the two
    # left neither; a rename swaps the inode in one step
    from nsvit_fast.io import write_text

    p = tmp_path / "f.txt"
    p.write_text("old")
    before = os.stat(p).st_ino
    with open(p) as held:
        write_text(p, "new")
        assert held.read() == "old"
    assert p.read_text() == "new" and os.stat(p).st_ino != before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["f.txt"]


def test_an_output_at_a_data_folders_root_is_refused(tmp_path):
    # --out equal to --data made the run's folder the data's (its figures became a class's images)
    from nsvit_fast.io import check_distinct

    (tmp_path / "data" / "a").mkdir(parents=True)
    with pytest.raises(NsvitError, match="is inside --data"):
        check_distinct({"--out": tmp_path / "data"}, {}, {"--data": tmp_path / "data"})
    check_distinct({"--out": tmp_path / "data" / "x.json"}, {}, {"--data": tmp_path / "data"}, files=("--out",))


def _stopped_then_resumed(make, train, kw, out, at, monkeypatch):
    """Run finetune into ``out`` until its checkpoint at (round, step) ``at``, stop it there as Ctrl-C
    would, then resume it from a fresh ``make()`` model; returns the resumed run's result."""
    from nsvit_fast.train import engine, finetune

    save = engine.Engine.save

    def stop_after(self, k, s):
        save(self, k, s)
        if (k, s) == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.Engine, "save", stop_after)
    with pytest.raises(KeyboardInterrupt):
        finetune(make(), train, out_dir=out, **kw)
    monkeypatch.setattr(engine.Engine, "save", save)
    return finetune(make(), train, out_dir=out, resume=True, **kw)


def test_a_resume_restores_the_ema_weights(tmp_path, monkeypatch):
    # a resume that left the EMA copy at the starting weights saved a model_ema.safetensors that
    # was not the uninterrupted run's
    from safetensors.torch import load_file

    from nsvit_fast.train import finetune

    train = digits("train").subset(96)
    kw = dict(rounds=2, model_steps=3, batch_size=32, lr=1e-3, method="plain", ema=0.5, checkpoint_every=1,
              progress=False)
    finetune(load_model("digits_vit"), train, out_dir=tmp_path / "ref", **kw)
    _stopped_then_resumed(lambda: load_model("digits_vit"), train, kw, tmp_path / "run", (1, 1), monkeypatch)
    a, b = (load_file(str(tmp_path / d / "model_ema.safetensors")) for d in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_checkpoint_with_an_edited_position_is_refused(tmp_path):
    # the check of a streamed run's consumed batches against its steps was never exercised
    from helpers import write_digits_folder

    from nsvit_fast.io import load_tensors, save_tensors
    from nsvit_fast.train import finetune

    (tmp_path / "d").mkdir()
    data = write_digits_folder(tmp_path / "d", n=64)
    kw = dict(rounds=1, model_steps=2, batch_size=16, method="plain", workers=0, progress=False)
    finetune(load_model("digits_vit"), str(data), out_dir=tmp_path / "run", **kw)
    ck = tmp_path / "run" / "checkpoint.safetensors"
    t, m = load_tensors(ck)
    assert m["stream"]["consumed"] == 2
    save_tensors(ck, t, {**m, "stream": {**m["stream"], "consumed": 5}})
    with pytest.raises(NsvitError, match="consumed is 5, but the run is 2 step"):
        finetune(load_model("digits_vit"), str(data), out_dir=tmp_path / "run", resume=True, **kw)


def test_a_resume_restores_the_global_rng_a_dropout_model_draws_from(tmp_path, monkeypatch):
    # a resume that left torch's RNG where the new process started it drew other dropout masks after
    # the stop: the run then ended elsewhere than the uninterrupted one (digits_vit has no dropout)
    from nsvit_fast.models import create_model
    from nsvit_fast.train import finetune

    def model():
        torch.manual_seed(0)
        return create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                            num_heads=2, drop_rate=0.3)

    train = digits("train").subset(96)
    kw = dict(rounds=1, model_steps=4, batch_size=32, lr=1e-3, method="plain", checkpoint_every=1, progress=False)
    ref = finetune(model(), train, out_dir=tmp_path / "ref", **kw).parts.state_dict()
    again = _stopped_then_resumed(model, train, kw, tmp_path / "run", (0, 2), monkeypatch).parts.state_dict()
    assert all(torch.equal(ref[k], again[k]) for k in ref)

"""Class folders read by name: a finetune on a folder records its classes with the weights, so
its val folder and later evaluation folders are labelled by name, not by sorted position; folders
named by number are read by value. Real digit scans in ImageFolder layout, a small timm ViT."""

import pytest
import torch

from helpers import save_pixels

from nsvit_fast import NsvitError, digits, load_model
from nsvit_fast.data import load_data
from nsvit_fast.data.folders import class_index
from nsvit_fast.models import create_model, save_model
from nsvit_fast.train import finetune

RUN = dict(rounds=1, model_steps=1, batch_size=8, method="plain", workers=0)


def _folder(root, classes, per_class=3):
    """Digits of class 0, 1, 2 ... saved under the given folder names, in that order."""
    ds = digits("test")
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j, i in enumerate((ds.labels == k).nonzero()[:per_class, 0].tolist()):
            save_pixels(ds.images[i], root / name / f"{j}.png")
    return root


def _model():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=4, embed_dim=64,
                        num_heads=2)


def test_numbered_folders_are_read_by_value(tmp_path):
    # ImageNet-V2's layout ("0"-"999") given as --data: torchvision's string order made "10" label 2
    for c in ("0", "1", "2", "10", "999"):
        (tmp_path / "v2" / c).mkdir(parents=True)
    classes, idx = class_index(tmp_path / "v2", None, 1000)
    assert idx == {"0": 0, "1": 1, "2": 2, "10": 10, "999": 999} and len(classes) == 1000
    # numbers that are not all output indices (1-based, say): in number order, "2" before "10"
    for c in ("1", "2", "10"):
        (tmp_path / "one_based" / c).mkdir(parents=True)
    with pytest.warns(UserWarning, match="read in number order"):  # a model trained in string order reads them otherwise
        assert class_index(tmp_path / "one_based", None, 3)[1] == {"1": 0, "2": 1, "10": 2}


def test_a_finetune_records_its_classes_and_reads_val_and_eval_folders_by_them(tmp_path):
    train = _folder(tmp_path / "train", ["ant", "bee", "cat", "dog"])
    parts = _model()
    res = finetune(parts, str(train), RUN, out_dir=tmp_path / "run", progress=False)
    assert res.parts.class_names == ["ant", "bee", "cat", "dog"]
    saved = load_model(None, checkpoint=tmp_path / "run" / "model.safetensors")
    assert saved.class_names == ["ant", "bee", "cat", "dog"]
    # a folder without "ant": by position "bee" was label 0; by name it is 1
    part = load_data(str(_folder(tmp_path / "val", ["bee", "cat", "dog"])), None, saved)
    assert sorted(set(part.labels.tolist())) == [1, 2, 3]
    assert part.labels.tolist() == [1] * 3 + [2] * 3 + [3] * 3


def test_a_val_folder_with_a_class_the_training_folder_lacks_is_refused(tmp_path):
    # same count of folders, one swapped for another that sorts first: every label moved by one
    train = _folder(tmp_path / "train", ["ant", "bee", "cat", "dog"])
    val = _folder(tmp_path / "val", ["aardvark", "ant", "bee", "cat"])
    with pytest.raises(NsvitError, match="class 'aardvark' is not one of the model's named classes"):
        finetune(_model(), str(train), RUN, val_data=str(val), progress=False)


def test_class_names_in_a_file_are_checked(tmp_path):
    parts = _model()
    parts.class_names = ["a", "b", "c", "d"]
    p = save_model(parts, tmp_path / "m.safetensors", metadata={"class_names": ["a", "a", "b", "c"]})
    with pytest.raises(NsvitError, match="'class_names' must be 4 distinct names"):
        load_model(None, checkpoint=p)


def test_a_finetune_on_new_classes_replaces_the_recorded_ones(tmp_path):
    """A model finetuned on ant..dog, finetuned again on a folder of other classes: those are the
    new task's names (it kept the old ones, refused the new val folder and saved wrong names)."""
    train = _folder(tmp_path / "train", ["ant", "bee", "cat", "dog"])
    finetune(_model(), str(train), RUN, out_dir=tmp_path / "run", progress=False)
    first = load_model(None, checkpoint=tmp_path / "run" / "model.safetensors")
    new = ["eel", "fox", "gnu", "hen"]
    res = finetune(first, str(_folder(tmp_path / "t2", new)), RUN, val_data=str(_folder(tmp_path / "v2", new[1:])),
                   progress=False)
    assert res.parts.class_names == new
    mixed = _folder(tmp_path / "mixed", ["ant", "bee", "cat", "eel"])  # partly the old classes: ambiguous
    with pytest.raises(NsvitError, match="'eel' is not one of the model's class names"):
        finetune(load_model(None, checkpoint=tmp_path / "run" / "model.safetensors"), str(mixed), RUN, progress=False)


def test_compare_refuses_models_that_name_their_outputs_differently():
    from nsvit_fast.eval.suite import check_comparable

    a, b = _model(), _model()
    a.class_names, b.class_names = ["ant", "bee", "cat", "dog"], ["bee", "ant", "cat", "dog"]
    with pytest.raises(NsvitError, match="name output 0 'ant' and 'bee'"):
        check_comparable({"a": a, "b": b}, streamed=False)
    b.class_names = list(a.class_names)
    check_comparable({"a": a, "b": b}, streamed=False)


def _eval(capsys, *args):
    from nsvit_fast.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _clean(out):
    import json

    return json.loads((out / "report.json").read_text())["records"][0]["value"]


def test_eval_classes_name_the_outputs_and_label_the_data_folder_by_them(tmp_path, capsys):
    # --classes was only passed to the folder suites: for --data it was ignored (and never counted),
    # so reversed names scored as the right ones
    data = _folder(tmp_path / "d", [f"c{k}" for k in range(10)], per_class=4)
    ev = ["eval", "--model", "digits_vit", "--data", data, "--suite", "clean", "--quiet"]
    right = ",".join(f"c{k}" for k in range(10))
    assert _eval(capsys, *ev, "--classes", right, "--out", tmp_path / "a")[0] == 0
    assert _eval(capsys, *ev, "--classes", ",".join(f"c{k}" for k in reversed(range(10))), "--out", tmp_path / "b")[0] == 0
    assert _clean(tmp_path / "a") >= 90 and _clean(tmp_path / "b") <= 30
    for bad, msg in (("a,b", "--classes gives 2 names (2 distinct, non-empty) for digits_vit's 10 outputs"),
                     (right.replace("c9", "c8"), "(9 distinct"), (right.replace("c9", ""), "(9 distinct, non-empty)")):
        code, err = _eval(capsys, *ev, "--classes", bad, "--out", tmp_path / "x")
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_eval_refuses_a_folder_of_none_of_the_recorded_classes_and_a_clashing_classes(tmp_path, capsys):
    # the same images under other folder names were read by position: 8% where the names give 50%
    train = _folder(tmp_path / "train", ["ant", "bee", "cat", "dog"])
    finetune(_model(), str(train), RUN, out_dir=tmp_path / "run", progress=False)
    ck = tmp_path / "run" / "model.safetensors"
    ev = ["eval", "--checkpoint", ck, "--suite", "clean", "--quiet"]
    other = _folder(tmp_path / "other", ["zeta", "yak", "xeno", "wolf"])
    code, err = _eval(capsys, *ev, "--data", other, "--out", tmp_path / "x")
    assert code == 2 and "class 'wolf' is not one of the model's named classes (ant, bee, cat, dog)" in err, err
    code, err = _eval(capsys, *ev, "--data", train, "--classes", "bee,ant,cat,dog", "--out", tmp_path / "x")
    assert code == 2 and "--classes differs from the class names" in err, err
    assert _eval(capsys, *ev, "--data", train, "--classes", "ant,bee,cat,dog", "--out", tmp_path / "ok")[0] == 0
    assert not (tmp_path / "x").exists()


def test_eval_names_keep_their_positions(tmp_path, capsys):
    # `--names ,zeroed` dropped the empty entry: the first model's row took "zeroed"
    import json

    zero = load_model("digits_vit")
    with torch.no_grad():
        zero.model.head.weight.zero_()
        zero.model.head.bias.zero_()
    f = save_model(zero, tmp_path / "zero.safetensors")
    code, err = _eval(capsys, "eval", "--model", "digits_vit", "--compare", f, "--names", ",zeroed", "--suite", "clean",
                      "--max-images", "40", "--quiet", "--out", tmp_path / "r")
    assert code == 0, err
    rec = {r["model"]: r["value"] for r in json.loads((tmp_path / "r" / "report.json").read_text())["records"]}
    assert rec["digits_vit"] >= 90 and rec["zeroed"] <= 20, rec


def test_swapped_class_names_in_a_file_are_refused(tmp_path):
    # class_names were outside the record digest: two names swapped by hand scored another labelling
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts = _model()
    parts.class_names = ["ant", "bee", "cat", "dog"]
    p = save_model(parts, tmp_path / "m.safetensors")
    assert load_model(None, checkpoint=p).class_names == ["ant", "bee", "cat", "dog"]
    with safe_open(str(p), framework="pt") as f:
        meta, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert "bee" in meta["class_names"]
    meta["class_names"] = 'json:["bee", "ant", "cat", "dog"]'
    save_file(t, str(tmp_path / "swapped.safetensors"), metadata=meta)
    with pytest.raises(NsvitError, match="record_digest differs"):
        load_model(None, checkpoint=tmp_path / "swapped.safetensors")


def test_a_model_file_digested_before_class_names_were_still_loads(tmp_path):
    # files written before the digest covered class_names (no record_digest_version) must load
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from nsvit_fast.models.loading import RECORD

    parts = _model()
    parts.class_names = ["ant", "bee", "cat", "dog"]
    p = save_model(parts, tmp_path / "m.safetensors")
    with safe_open(str(p), framework="pt") as f:
        meta, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("record_digest_version")
    old = [json.loads(meta[k][5:]) if meta[k].startswith("json:") else meta[k] for k in RECORD]
    meta["record_digest"] = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    save_file(t, str(tmp_path / "old.safetensors"), metadata=meta)
    assert load_model(None, checkpoint=tmp_path / "old.safetensors").class_names == ["ant", "bee", "cat", "dog"]


def test_a_resume_after_a_training_class_was_renamed_names_the_rename_not_the_val_data(tmp_path):
    # the starting model took the renamed classes from the training folder, so the val folder's
    # (unchanged) names were refused first: the refusal blamed the val data, not the rename
    train = _folder(tmp_path / "train", ["ant", "bee", "cat", "dog"])
    val = _folder(tmp_path / "val", ["ant", "bee", "cat", "dog"], per_class=2)
    run = dict(RUN, rounds=1, checkpoint_every=1)
    finetune(_model(), str(train), run, val_data=str(val), out_dir=tmp_path / "run", progress=False)
    (train / "dog").rename(train / "eel")
    with pytest.raises(NsvitError, match=r"class folders of .*\(dog gone, eel new\)"):
        finetune(_model(), str(train), run, val_data=str(val), out_dir=tmp_path / "run", progress=False,
                 resume=True)


def test_compared_models_are_read_by_the_names_one_of_them_records(tmp_path):
    # a first model without recorded names (a timm train.py file) read the folder by position, and a
    # finetuned --compare model that records its classes was scored on those labels: both 0% on a
    # folder missing one class, where the names give 33%
    from nsvit_fast.eval import evaluate

    train = _folder(tmp_path / "train", ["ant", "bee", "cat", "dog"])
    finetune(_model(), str(train), RUN, out_dir=tmp_path / "run", progress=False)
    named, unnamed = (load_model(None, checkpoint=tmp_path / "run" / "model.safetensors") for _ in range(2))
    unnamed.class_names = None
    for m in (named, unnamed):  # always "dog", output 3
        with torch.no_grad():
            m.model.head.weight.zero_()
            m.model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    val = _folder(tmp_path / "val", ["bee", "cat", "dog"])
    with pytest.warns(UserWarning, match="model 'start' records no class names: its outputs are read as 'ns'"):
        rep = evaluate({"start": unnamed, "ns": named}, str(val), ["clean"], progress=False)
    assert rep.values("start", "clean") == rep.values("ns", "clean") == [pytest.approx(100 / 3)]
    assert unnamed.class_names is None  # the caller's adapter keeps what it had (a save would record them)

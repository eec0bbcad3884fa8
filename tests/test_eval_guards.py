"""Guards on the evaluation metrics' bookkeeping: batch weighting, noise scaling, running maxima,
--max-images spreading, RNG hygiene, random patch draws and the nullspace's rank tolerance."""

import pytest
import torch

import nsvit_fast
from helpers import save_pixels
from nsvit_fast.eval.nullspace_metrics import bank_effect, exact_noise_effect
from nsvit_fast.nullspace import default_rtol, nullspace_basis
from nsvit_fast.synth.bank import NoiseBank

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def parts():
    return nsvit_fast.load_model("digits_vit")


@pytest.fixture(scope="module")
def test_images():
    return nsvit_fast.digits("test")


def _random_bank(parts, m=3, scale=1.0):
    """M random token noises large enough to change predictions (MSE-prob ~0.1-0.25 on digits)."""
    g = torch.Generator().manual_seed(0)
    noises = torch.randn(m, *parts.token_shape, generator=g) * scale
    return NoiseBank(noises, noises.flatten(1).norm(dim=1), torch.ones(m), torch.ones(m),
                     torch.ones(m, dtype=torch.long), torch.ones(m, dtype=torch.bool), torch.ones(m), meta={})


def test_bank_effect_does_not_depend_on_batch_size(parts, test_images):
    """The noisebank suite's MSE-prob and match rate are per-image means: a short last batch
    (397 = 256 + 141) must be weighted by its own size, not by the batch size."""
    x = test_images.images
    assert x.shape[0] == 397
    bank = _random_bank(parts)
    one = bank_effect(parts, bank, x, batch_size=397)
    two = bank_effect(parts, bank, x, batch_size=256)
    assert one["mse_prob"] > 0.05 and one["match_rate"] < 0.95  # the noises do move the model
    assert two["mse_prob"] == pytest.approx(one["mse_prob"], rel=1e-5, abs=0)
    assert two["match_rate"] == pytest.approx(one["match_rate"], rel=1e-6, abs=0)
    assert torch.allclose(torch.tensor(two["per_noise_mse"]), torch.tensor(one["per_noise_mse"]), rtol=1e-5)
    assert torch.allclose(torch.tensor(two["per_noise_match"]), torch.tensor(one["per_noise_match"]), rtol=1e-6)


def test_exact_noise_effect_does_not_depend_on_batch_size(parts, test_images):
    """Exact-nullspace MSE-prob and match rate are per-image means over all 397 images, whatever
    the batching (the noise draws are the same sequence either way)."""
    x = test_images.images
    one = exact_noise_effect(parts, x, scale=10.0, batch_size=397)
    two = exact_noise_effect(parts, x, scale=10.0, batch_size=256)
    assert one["mse_prob"] > 0 and one["match_rate"] == 1.0
    # MSE-prob is float32 round-off here (~1e-13): compare relatively, with no absolute slack
    assert two["mse_prob"] == pytest.approx(one["mse_prob"], rel=1e-5, abs=0)
    assert two["match_rate"] == one["match_rate"]


def test_exact_noise_norm_is_scale_times_each_image_norm(parts, test_images):
    """exact_noise_effect's noise has norm ``scale`` x each image's own norm (a relative scale),
    not ``scale`` in absolute pixel units."""
    x = test_images.images[:24]
    seen = []
    h = parts.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    try:
        exact_noise_effect(parts, x, scale=3.0, batch_size=10)
    finally:
        h.remove()
    assert len(seen) == 6  # clean, noisy for each of 3 batches
    clean = torch.cat(seen[0::2]).double()
    noisy = torch.cat(seen[1::2]).double()
    assert torch.equal(clean, x.double())
    norm_x = x.double().flatten(1).norm(dim=1)
    ratio = (noisy - clean).flatten(1).norm(dim=1) / norm_x
    assert norm_x.std() > 1  # images of different norms: an absolute norm could not pass
    assert torch.allclose(ratio, torch.full_like(ratio, 3.0), rtol=1e-4)


def test_exact_noise_logits_rel_is_the_max_over_batches(parts, test_images):
    """logits_rel is the largest relative logit change over all batches, not the last batch's:
    a last batch of one black image (noise 0 x its zero norm: no change) must not reset it."""
    x = test_images.images[:40]
    ref = exact_noise_effect(parts, x, scale=10.0, batch_size=40)
    assert ref["logits_rel"] > 0
    x_black = torch.cat([x, torch.zeros(1, *x.shape[1:])])
    r = exact_noise_effect(parts, x_black, scale=10.0, batch_size=40)  # batches of 40 and 1
    assert r["logits_rel"] == ref["logits_rel"]
    # and over many small batches it is at least each batch's own value
    seen = []
    h = parts.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    try:
        r2 = exact_noise_effect(parts, x, scale=10.0, batch_size=4)
    finally:
        h.remove()
    per = [float((zn - z).abs().max() / z.abs().max()) for z, zn in zip(seen[0::2], seen[1::2])]
    assert len(per) == 10 and max(per) > per[-1]
    assert r2["logits_rel"] == pytest.approx(max(per), rel=1e-12, abs=0)


def test_folder_max_images_spreads_over_every_class(parts, test_images, tmp_path, monkeypatch):
    """--max-images on a class-sorted folder reads images spread over the whole folder (every
    class), not the first max_images files (only the first classes)."""
    import nsvit_fast.data.folders as folders
    from nsvit_fast.eval.ood import folder_accuracy

    labels = test_images.labels
    for c in range(10):
        d = tmp_path / str(c)
        d.mkdir()
        for j, i in enumerate((labels == c).nonzero().flatten()[:4].tolist()):
            save_pixels(test_images.images[i], d / f"{j}.png")
    read = []
    real = folders.read_rgb
    monkeypatch.setattr(folders, "read_rgb", lambda p: (read.append(str(p)), real(p))[1])
    acc = folder_accuracy(parts, tmp_path, "folder", max_images=10, batch_size=4)
    assert len(read) == 10
    assert sorted({p.split("/")[-2] for p in read}) == [str(c) for c in range(10)]
    assert acc >= 0.7  # real digits, read and scored


def test_attack_accuracy_restores_the_global_rng(parts, test_images):
    """attack_accuracy seeds the global torch RNG for its attack and must give the caller's RNG
    state back unchanged."""
    from nsvit_fast.eval.attacks import attack_accuracy

    x, y = test_images.images[:4], test_images.labels[:4]
    torch.manual_seed(12345)
    torch.rand(7)
    before = torch.get_rng_state()
    acc = attack_accuracy(parts, x, y, "pgd", steps=1)
    assert 0.0 <= acc <= 1.0
    assert torch.equal(torch.get_rng_state(), before)


def test_patchfool_random_patches_reach_every_patch(parts):
    """patch_select="random" draws from all num_patches patches, the last one included."""
    from nsvit_fast.eval.patchfool import PatchFool

    atk = PatchFool(parts, patch_select="random", steps=1, seed=0)
    idx = atk.choose_patches(torch.zeros(512, 3, 32, 32), torch.zeros(512, dtype=torch.long))
    assert idx.shape == (512, 1)
    assert parts.num_patches == 16
    assert sorted(set(idx.flatten().tolist())) == list(range(parts.num_patches))


def test_default_rank_tolerance_is_max_dim_times_float32_eps():
    """README: default rtol = max(D, C*r^2) * eps_float32; for both D < C*r^2 and D > C*r^2."""
    assert default_rtol((96, 192)) == default_rtol((192, 96)) == 192 * EPS32
    digits_vit = nsvit_fast.load_model("digits_vit")  # D = 96 < C*r*r = 3*8*8 = 192
    ns = nullspace_basis(digits_vit)
    assert (ns.embed_dim, ns.input_dim) == (96, 192)
    assert ns.rtol == pytest.approx(192 * EPS32, rel=1e-12, abs=0)
    # D = 192 > C*r*r = 3*4*4 = 48
    wide = nsvit_fast.load_model("vit_tiny_patch16_224", depth=1, patch_size=4, img_size=32)
    ns = nullspace_basis(wide)
    assert (ns.embed_dim, ns.input_dim) == (192, 48)
    assert ns.rtol == pytest.approx(192 * EPS32, rel=1e-12, abs=0)


def test_a_bank_that_does_not_fit_is_refused_before_any_suite_runs(parts, test_images, monkeypatch):
    """The bank's shape was checked at the noisebank suite's turn, after the suites before it had run
    (minutes of PGD on a real set) for nothing."""
    from nsvit_fast.eval import suite

    ran = []
    import dataclasses

    monkeypatch.setitem(suite.SUITES, "clean", dataclasses.replace(suite.SUITES["clean"],
                                                                   run=lambda *a, **k: ran.append("clean")))
    g = torch.Generator().manual_seed(0)
    noises = torch.randn(2, parts.token_shape[0] + 1, parts.token_shape[1], generator=g)
    bank = NoiseBank(noises, noises.flatten(1).norm(dim=1), torch.ones(2), torch.ones(2),
                     torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), torch.ones(2), meta={},
                     source="b.safetensors")
    with pytest.raises(nsvit_fast.NsvitError, match=r"b.safetensors: noises of shape \(17, 96\) do not fit"):
        suite.evaluate({"m": parts}, test_images, ["clean", "noisebank"], bank=bank, max_images=8, progress=False)
    assert ran == []


def test_one_model_object_under_two_names_is_refused(parts, test_images):
    # finetune trains its model in place: {"start": parts, "ns": res.parts} scored the finetuned model
    # twice, under two names, without a word
    with pytest.raises(nsvit_fast.NsvitError, match="models 'start' and 'ns' are one model object"):
        nsvit_fast.eval.evaluate({"start": parts, "ns": parts}, test_images, ["clean"], max_images=8, progress=False)
    with pytest.raises(nsvit_fast.NsvitError, match="are one model object"):
        nsvit_fast.eval.evaluate({"a": parts.model, "b": parts.model}, test_images, ["clean"], max_images=8,
                                 progress=False)


def test_a_report_says_what_it_was_computed_on(parts, test_images, tmp_path):
    # report.json held the numbers only: not the data, the image count or whose weights
    from nsvit_fast.eval.report import Report
    from nsvit_fast.models import weights_fingerprint

    rep = nsvit_fast.eval.evaluate({"m": parts}, test_images, ["clean"], max_images=8, progress=False)
    assert rep.context == {"data": "digits/test", "images": 8,
                           "models": {"m": {"arch": parts.arch, "weights": weights_fingerprint(parts)}}}
    rep.save(tmp_path)
    again = Report.load(tmp_path / "report.json")
    assert again.context == rep.context
    # seeds of one evaluation share it; reports of other weights or data keep each (the first's named all rows)
    from nsvit_fast.eval.report import merge_context

    assert merge_context(rep.context, again.context) == rep.context
    other = nsvit_fast.eval.evaluate({"m": parts}, test_images, ["clean"], max_images=6, seed=1, progress=False)
    both = rep.merge(other)
    assert both.context == {"merged": [rep.context, other.context]}
    assert merge_context(both.context, rep.context) == both.context
    assert "Merged from 2 evaluations:" in both.context_line() and "6 images" in both.context_line()
    assert f"Data: digits/test, 8 images. Models: m: {parts.arch} (weights {weights_fingerprint(parts)})." in (
        tmp_path / "report.md").read_text()


def test_a_bank_learned_on_other_weights_names_the_row(parts, test_images):
    # "bank was learned on other weights" did not say which compared model it meant
    import copy
    import warnings

    from nsvit_fast.synth import synthesize

    bank = synthesize(parts, nsvit_fast.digits("train").subset(64), max_steps=1, batch_size=32, heldout=16,
                      progress=False)
    other = copy.deepcopy(parts)
    with torch.no_grad():
        other.model.head.bias.add_(0.1)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        nsvit_fast.eval.evaluate({"own": parts, "other": other}, test_images, ["noisebank"], bank=bank, max_images=8,
                                 progress=False)
    lines = [str(w.message) for w in said if "learned on other weights" in str(w.message)]
    assert lines and all(ln.startswith("model 'other': ") for ln in lines), lines


def _digit_folder(root, test_images, per_class=2):
    """``per_class`` test digits of each class as PNGs in folders named "0".."9" (digits_vit's names)."""
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for j, i in enumerate((test_images.labels == c).nonzero().flatten()[:per_class].tolist()):
            save_pixels(test_images.images[i], root / str(c) / f"{j}.png")
    return root


def test_max_images_picks_the_same_spread_images_from_every_kind_of_data(parts, test_images, tmp_path):
    # an ImageDataset kept its first max_images (one class of a class-sorted folder read whole), an
    # EvalImages ignored max_images while the report's context said it was applied
    from nsvit_fast.data import load_data
    from nsvit_fast.eval.source import FolderImages, TensorImages

    root = _digit_folder(tmp_path / "f", test_images)
    whole = load_data(root, parts=parts)
    kinds = {"folder": str(root), "dataset": whole, "tensor": TensorImages(whole.images, whole.labels),
             "streamed": FolderImages(root, parts)}
    seen = {}
    for kind, data in kinds.items():
        rep = nsvit_fast.eval.evaluate(parts, data, ["clean"], max_images=5, progress=False)
        assert rep.context["images"] == 5, kind
        seen[kind] = [r.value for r in rep.records]
    assert len({tuple(v) for v in seen.values()}) == 1, seen
    from nsvit_fast.eval.source import as_eval_images

    labels = [int(y) for _, ys in as_eval_images(whole, parts, 5).batches(8) for y in ys]
    assert labels == [0, 2, 5, 7, 9]  # spread over the classes, not the first five (0, 0, 1, 1, 2)
    # a shuffled set keeps its first ones, as load_data and the CLI cut digits
    first = [int(y) for _, ys in as_eval_images(test_images, parts, 5).batches(8) for y in ys]
    assert first == test_images.labels[:5].tolist()


def _with_bad_file(root):
    (root / "3" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_a_skipped_file_is_counted_out_of_the_report_and_the_attack(parts, test_images, tmp_path):
    # with on_bad_image skip the context said 21 images for 20 scored; evaluate on a folder path ignored
    # skip for the data itself; an attack's n picked the bad file and attacked one fewer without a word
    import warnings

    from nsvit_fast.eval.attacks import attack_accuracy_on
    from nsvit_fast.eval.source import FolderImages

    root = _with_bad_file(_digit_folder(tmp_path / "f", test_images))
    with pytest.raises(nsvit_fast.NsvitError, match="bad.png"):
        nsvit_fast.eval.evaluate(parts, str(root), ["clean"], progress=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        rep = nsvit_fast.eval.evaluate(parts, str(root), ["clean"], on_bad_image="skip", progress=False)
        acc = attack_accuracy_on(parts, FolderImages(root, parts, on_bad_image="skip"), "fgsm", n=21)
    assert rep.context["images"] == 20 and rep.context["skipped"] == 1
    assert "(1 unreadable skipped)" in rep.context_line()
    assert any("1 of the n=21 images picked were unreadable (skipped): 20 attacked" in str(w.message) for w in said)
    assert 0 < acc <= 1
    # n picks that are all unreadable: the attack says so (the folder itself has readable images)
    (root / "0" / "-bad.png").write_bytes(b"not an image")  # sorted first, so the one n=1 picks
    with pytest.raises(nsvit_fast.NsvitError, match=r"the 1 image\(s\) picked for n=1 were all unreadable"):
        attack_accuracy_on(parts, FolderImages(root, parts, on_bad_image="skip"), "fgsm", n=1)


def test_a_folder_with_no_readable_image_is_one_error(parts, test_images, tmp_path):
    # nullspace divided by zero; the attacks said "accuracy of an empty image set is undefined"
    root = tmp_path / "f"
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        (root / str(c) / "x.png").write_bytes(b"not an image")
    for suite in ("nullspace", "fgsm", "clean"):
        with pytest.raises(nsvit_fast.NsvitError, match=r"no readable image among the 10 read \(all skipped"):
            nsvit_fast.eval.evaluate(parts, str(root), [suite], on_bad_image="skip", progress=False)


def test_folder_suites_refuse_a_symlink_loop_and_a_class_of_dot_files_only(parts, test_images, tmp_path):
    # a loop was followed (one class read 40 times over: Sketch 11.8 instead of 96.8); a class folder of
    # macOS ._ files passed the check and failed in torchvision's traceback after the other suites ran
    import os

    from nsvit_fast.eval.ood import check_folder

    loop = _digit_folder(tmp_path / "loop", test_images)
    os.symlink("..", loop / "9" / "back")
    with pytest.raises(nsvit_fast.NsvitError, match="symlink loop"):
        nsvit_fast.eval.evaluate(parts, test_images, ["clean", "imagenet-sketch"], max_images=4, progress=False,
                                 folders={"imagenet-sketch": str(loop)})
    dots = _digit_folder(tmp_path / "dots", test_images)
    for f in (dots / "4").iterdir():
        f.rename(f.with_name("._" + f.name))
    with pytest.raises(nsvit_fast.NsvitError, match=r"hold no images, e.g. \['4'\]"):
        check_folder(dots, "imagenet-sketch", [str(c) for c in range(10)])


def test_numbered_folders_read_by_value_without_a_zero_warn(tmp_path):
    # 1..9 of a set numbered 1..10 were read one label off (folder 3 as class 3) without a word
    import warnings

    from nsvit_fast.data.folders import class_index

    for c in range(1, 10):
        (tmp_path / str(c)).mkdir()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        classes, idx = class_index(tmp_path, None, 10)
    assert idx["3"] == 3 and any("there is no folder '0'" in str(w.message) for w in said)
    (tmp_path / "0").mkdir()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        class_index(tmp_path, None, 10)
    assert not any("no folder '0'" in str(w.message) for w in said)
    some = tmp_path / "some"  # a subset of classes (3 and 7) is no 1-based set
    for c in ("3", "7"):
        (some / c).mkdir(parents=True)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert class_index(some, None, 10)[1] == {"3": 3, "7": 7}
    assert not any("no folder '0'" in str(w.message) for w in said)


def test_a_hand_edited_report_is_refused_naming_the_record(tmp_path):
    import json

    from nsvit_fast.eval.report import Report

    good = {"model": "a", "seed": 0, "suite": "clean", "setting": "", "metric": "acc", "value": 99.0}
    assert Report.from_dict({"kind": "nsvit-fast/report", "records": [good]}).records[0].value == 99.0
    cases = {"no records": ({"kind": "nsvit-fast/report"}, "'records' must be a JSON list"),
             "a list": ([good], "not an nsvit-fast report"),
             "keys missing": ({"kind": "nsvit-fast/report", "records": [{"model": "a", "seed": 0}]},
                              "record 0 must be an object with the keys"),
             "value a string": ({"kind": "nsvit-fast/report", "records": [{**good, "value": "high"}]},
                                "record 0: value must be a finite number, got 'high'"),
             "seed a string": ({"kind": "nsvit-fast/report", "records": [good, {**good, "seed": "x"}]},
                               "record 1: seed must be an integer"),
             "suite a number": ({"kind": "nsvit-fast/report", "records": [{**good, "suite": 3}]},
                                "record 0: suite must be a string")}
    for what, (d, msg) in cases.items():
        (tmp_path / "report.json").write_text(json.dumps(d))
        with pytest.raises(nsvit_fast.NsvitError, match=msg):
            Report.load(tmp_path / "report.json")

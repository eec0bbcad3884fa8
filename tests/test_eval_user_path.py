"""Evaluation as a user meets it: --compare of models that cannot share labels, AutoAttack on a
class-sorted folder, an incomplete ImageNet-C tree, the progress bar, and report columns at a
setting other than the paper's."""

import io
import sys

import pytest
import torch

from helpers import save_pixels

from nsvit_fast import ImageDataset, NsvitError, digits, load_model
from nsvit_fast.eval import CORRUPTIONS, Report, attack_accuracy, evaluate
from nsvit_fast.eval.corruptions import SEVERITIES
from nsvit_fast.eval.suite import SUITES, fmt_setting


@pytest.fixture(scope="module")
def parts():
    return load_model("digits_vit")


def tiny_vit(num_classes, img_size=32):
    torch.manual_seed(0)
    return load_model("vit_tiny_patch16_224", depth=1, img_size=img_size, patch_size=8, num_classes=num_classes)


def sorted_digits(per_class):
    """``per_class`` test digits of each class, class after class (as an ImageFolder lists them)."""
    d = digits("test")
    pick = torch.cat([(d.labels == k).nonzero()[:per_class, 0] for k in range(10)])
    return d.images[pick], d.labels[pick]


def test_compare_refuses_models_that_cannot_share_the_first_models_labels(tmp_path):
    # a folder of 4 ImageNet synsets: the 1000-class model was scored on the 4-class model's labels
    # (0-3 by folder position, not its synset outputs): 0.00 under --compare, 25.00 alone
    from timm.data import ImageNetInfo

    x = digits("test").images
    for k, wnid in enumerate(ImageNetInfo().label_names()[:4]):
        (tmp_path / wnid).mkdir()
        for j in range(2):
            save_pixels(x[2 * k + j], tmp_path / wnid / f"{j}.png")
    four, wide = tiny_vit(4), tiny_vit(1000)
    ran = []
    with pytest.raises(NsvitError, match="'four' and 'wide' have 4 and 1000 classes"):
        evaluate({"four": four, "wide": wide}, str(tmp_path), ["clean"], log=ran.append)
    assert ran == []  # before any suite ran
    assert len(evaluate({"wide": wide}, str(tmp_path), ["clean"], progress=False).records) == 1  # alone: fine


def test_compare_refuses_another_input_size_and_takes_another_normalisation(parts):
    # the images are made once, for the first model: a 64-px model was handed 32-px images after
    # the first model's suites had run
    from nsvit_fast.models.loading import create_model

    data = ImageDataset(*sorted_digits(3))
    ran = []
    with pytest.raises(NsvitError, match=r"'digits' and 'big' take input_size \(3, 32, 32\) and \(3, 64, 64\)"):
        evaluate({"digits": parts, "big": tiny_vit(10, img_size=64)}, data, ["clean"], log=ran.append)
    assert ran == []
    # mean and std may differ: each adapter normalises the pixels itself, so each scores as alone
    torch.manual_seed(0)
    other = create_model("vit_tiny_patch16_224", mean=(0.2,) * 3, std=(0.3,) * 3, depth=1, img_size=32, patch_size=8,
                         num_classes=10)
    both = evaluate({"digits": parts, "other": other}, data, ["clean", "fgsm"], progress=False)
    for name, m in (("digits", parts), ("other", other)):
        alone = evaluate({name: m}, data, ["clean", "fgsm"], progress=False)
        assert [r.value for r in both.records if r.model == name] == [r.value for r in alone.records]


def test_autoattack_attacks_every_class_of_a_class_sorted_set(parts, tmp_path, monkeypatch):
    # AutoAttack took the first n images: one or two classes of a class-sorted folder
    from nsvit_fast.extras import load_torchattacks

    ta = load_torchattacks()
    seen = []
    real = ta.AutoAttack.forward
    monkeypatch.setattr(ta.AutoAttack, "forward", lambda self, x, y: (seen.append(y.cpu()), real(self, x, y))[1])
    x, y = sorted_digits(5)  # 50 images, 5 of each class
    suite = "autoattack:n=10,eps=16/255"  # 16/255 breaks them all fast
    rep = evaluate(parts, ImageDataset(x, y), [suite], progress=False)
    assert sorted(torch.cat(seen).tolist()) == list(range(10))  # one image of each class
    pick = torch.linspace(0, 49, 10).round().long()
    seen.clear()
    assert rep.values(parts.name, "autoattack") == [100 * attack_accuracy(parts, x[pick], y[pick], "autoattack",
                                                                          eps=16 / 255, n=10)]
    # a streamed folder (class-sorted on disk) the same way
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(50):
        (folder / f"digit{int(y[i])}").mkdir(exist_ok=True)
        save_pixels(x[i], folder / f"digit{int(y[i])}" / f"{i:02d}.png")
    seen.clear()
    evaluate(parts, str(folder), [suite], progress=False)
    assert sorted(torch.cat(seen).tolist()) == list(range(10))


def test_an_incomplete_imagenet_c_tree_is_refused_before_any_suite_runs(parts, tmp_path):
    # only one <corruption>/<severity> folder was checked up front: a class missing from another
    # stopped the run after the suites before it (and part of ImageNet-C) had run
    x, y = sorted_digits(1)
    for c in CORRUPTIONS:
        for s in SEVERITIES:
            for k in range(10):
                (tmp_path / c / str(s) / str(k)).mkdir(parents=True)
                save_pixels(x[k], tmp_path / c / str(s) / str(k) / "0.png")
    (tmp_path / CORRUPTIONS[0] / "2" / "7" / "0.png").unlink()
    (tmp_path / CORRUPTIONS[0] / "2" / "7").rmdir()
    ran = []
    data = ImageDataset(x, y)
    with pytest.raises(NsvitError, match=rf"imagenet-c/{CORRUPTIONS[0]}/2: incomplete, 9 of 10 class folders"):
        evaluate(parts, data, ["clean", "imagenet-c"], folders={"imagenet-c": tmp_path}, log=ran.append)
    assert ran == []
    (tmp_path / CORRUPTIONS[0] / "2" / "7").mkdir()  # back, but empty
    with pytest.raises(NsvitError, match=rf"imagenet-c/{CORRUPTIONS[0]}/2: 1 class folder\(s\) hold no images"):
        evaluate(parts, data, ["clean", "imagenet-c"], folders={"imagenet-c": tmp_path}, log=ran.append)
    assert ran == []


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress,terminal,shown", [(True, True, True), (True, False, False), (False, True, False)])
def test_suites_show_a_per_batch_bar_on_a_terminal_only(parts, tmp_path, monkeypatch, progress, terminal, shown):
    # no bar inside a suite: corruptions or CW on a 50k set ran for hours without a word
    import nsvit_fast.eval.suite as suite_mod

    monkeypatch.setattr(suite_mod, "ACC_BATCH", 8)  # 3 batches of the 20 images
    monkeypatch.setattr(suite_mod, "CORRUPTIONS", ("gaussian_noise", "jpeg_compression"))  # 10 sets, not 75
    x, y = sorted_digits(2)
    for i in range(20):
        (tmp_path / f"digit{int(y[i])}").mkdir(exist_ok=True)
        save_pixels(x[i], tmp_path / f"digit{int(y[i])}" / f"{i:02d}.png")
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    quiet = dict(progress=progress, log=lambda *_: None)
    evaluate(parts, str(tmp_path), ["clean", "fgsm", "nullspace", "imagenet-v2", "corruptions"],
             folders={"imagenet-v2": tmp_path}, model_classes=[f"digit{k}" for k in range(10)], **quiet)
    evaluate(parts, ImageDataset(x, y), ["corruptions"], **quiet)  # in memory: a step per corrupted set
    out = err.getvalue()
    bars = ["clean:   0%| | 0/3", "fgsm:   0%| | 0/1", "nullspace:   0%| | 0/1", "imagenet-v2:   0%| | 0/1",
            "corruptions:   0%| | 0/3", "corruptions:   0%| | 0/10"]
    squeezed = " ".join(out.split())
    assert [b for b in bars if " ".join(b.split()) in squeezed] == (bars if shown else [])


def test_a_column_off_the_papers_setting_is_labelled_and_left_out_of_the_average(parts):
    # `--suite 'clean;fgsm:eps=8/255'` gave a column "FGSM" that entered the paper's Average
    rep = evaluate(parts, digits("test").subset(32), ["clean", "fgsm:eps=8/255", "pgd:steps=2"], progress=False)
    clean = rep.values(parts.name, "clean")[0]
    assert [c[2] for c in rep.columns()] == ["Clean", "FGSM (eps=8/255)", "PGD (eps=4/255,alpha=1/255,steps=2)"]
    assert rep.values(parts.name, "fgsm")[0] < clean and rep.average(parts.name) == pytest.approx(clean)
    table = rep.table2()
    assert table.startswith("| model | Clean | FGSM (eps=8/255) | PGD (eps=4/255,alpha=1/255,steps=2) | Average |")
    assert "The Average leaves out FGSM (eps=8/255): not the paper's setting." in table
    # CW at another setting too; with FGSM at both, the paper's 1/255 enters and 8/255 stays out
    rep.add(parts.name, 0, "cw", fmt_setting({**SUITES["cw"].defaults, "steps": 10}), "acc", 20.0)
    rep.add(parts.name, 0, "fgsm", "eps=1/255", "acc", 60.0)
    assert rep.average(parts.name) == pytest.approx((clean + 60.0) / 2)
    assert "leaves out CW (c=1,kappa=0,steps=10,lr=0.01), FGSM (eps=8/255):" in rep.table2()


def test_the_papers_settings_render_as_before():
    # byte for byte the table of the code before the setting labels (paper settings only)
    rep = Report()
    for seed, shift in ((0, 0.0), (1, 1.0)):
        for suite, metric, v in (("clean", "acc", 90.0), ("patchfool", "acc", 5.0), ("cw", "acc", 20.0),
                                 ("fgsm", "acc", 60.0), ("pgd", "acc", 40.0), ("autoattack", "acc", 30.0),
                                 ("nullspace", "match_rate", 100.0), ("corruptions", "mce", 70.0)):
            setting = "ref=alexnet(approx)" if suite == "corruptions" else fmt_setting(SUITES[suite].defaults)
            rep.add("m", seed, suite, setting, metric, v + shift)
    assert rep.table2() == (
        "| model | Clean | PatchFool | CW | FGSM | C↓ | PGD | AutoAttack | NS match | Average |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        "| m | 90.50 ± 0.71 | 5.50 ± 0.71 | 20.50 ± 0.71 | 60.50 ± 0.71 | 70.50 ± 0.71 | 40.50 ± 0.71 | "
        "30.50 ± 0.71 | 100.50 ± 0.71 | 41.30 |\n\n"
        "Accuracy in %, C↓ is mCE (lower is better; the Average uses 100 − mCE). Seeds: [0, 1]; mean ± std "
        "over seeds. mCE against AlexNet on on-the-fly corruptions is approximate (AlexNet's errors were measured "
        "on the original ImageNet-C files); the imagenet-c suite on the pre-generated folders gives the "
        "comparable number.\n")

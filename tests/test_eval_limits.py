"""Evaluation at its limits, on the committed digits_vit and real test digits: suite settings past
float32's range are refused with one line before any model runs (they gave nonsense numbers or a
traceback), an attack's ``n`` past the images is recorded as the n attacked (not "n=1000" for 4
images), and a partial ImageNet-C tree shows its mean accuracy in the report (it had no column)."""

import warnings

import pytest
import torch

from helpers import save_pixels

from nsvit_fast import ImageDataset, NsvitError, digits, load_model
from nsvit_fast.cli import main
from nsvit_fast.eval import accuracy, attack_accuracy, corrupt, evaluate


@pytest.fixture(scope="module")
def parts():
    return load_model("digits_vit")


def per_class(n):
    """``n`` test digits of each class, class after class."""
    d = digits("test")
    pick = torch.cat([(d.labels == k).nonzero()[:n, 0] for k in range(10)])
    return d.images[pick], d.labels[pick]


def cli(capsys, *args):
    """(exit code, stdout, stderr) of the CLI run in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# each gave a number or a traceback before (measured): scale 1e20 matched 25 % (1e30: NaN MSE-prob),
# pgd_l2 at 1e30 and cw at c=1e39 scored the clean images (100 %), kappa / lr 1e300 raised
# "value cannot be converted to type float without overflow", gamma 1e300 grew the lr past float32
PAST = [("nullspace:scale=1e20", "nullspace: scale must be <= 1e+06, got 1e+20"),
        ("nullspace:scale=1e30", "nullspace: scale must be <= 1e+06, got 1e+30"),
        ("pgd_l2:eps=1e30,alpha=1e30,steps=1", "pgd_l2: eps must be <= 10000, got 1e+30"),
        ("pgd_l2:alpha=1e30,steps=1", "pgd_l2: alpha must be <= 10000, got 1e+30"),
        ("cw:c=1e39,steps=2", "cw: c must be <= 10000, got 1e+39"),
        ("cw:c=1e8,steps=2", "cw: c must be <= 10000, got 1e+08"),  # CW's early stop: the clean images
        ("cw:kappa=1e308,steps=1", "cw: kappa must be <= 1e+06, got 1e+308"),
        ("cw:lr=1e300,steps=1", "cw: lr must be <= 1e+06, got 1e+300"),
        ("patchfool:lr=1e300,steps=1", "patchfool: lr must be <= 1e+06, got 1e+300"),
        ("patchfool:atten_loss_weight=1e30,steps=1", "patchfool: atten_loss_weight must be <= 1e+06, got 1e+30"),
        ("patchfool:gamma=1e300,steps=12", "patchfool: gamma must be <= 1, got 1e+300"),
        ("pgd:steps=" + "9" * 400, "pgd: steps must be <= 2147483647, got 999999... (400 digits)")]


@pytest.mark.parametrize("spec,msg", PAST)
def test_settings_past_float32s_range_are_refused_before_any_model_runs(parts, spec, msg):
    x, y = per_class(1)
    ran = []
    with pytest.raises(NsvitError) as e:
        evaluate(parts, ImageDataset(x, y), ["clean", spec], progress=False, log=ran.append)
    assert str(e.value) == msg
    assert ran == []  # refused up front: clean did not run either


def test_the_attack_api_refuses_them_too(parts):
    x, y = per_class(1)
    with pytest.raises(NsvitError, match=r"attack cw: c must be a finite number in \(0, 10000\], got 1e\+39"):
        attack_accuracy(parts, x, y, "cw", c=1e39, steps=2)  # was 1.0: the clean images
    with pytest.raises(NsvitError, match=r"attack cw: kappa must be a finite number in \[0, 1e\+06\]"):
        attack_accuracy(parts, x, y, "cw", kappa=1e308, steps=1)  # was a RuntimeError
    with pytest.raises(NsvitError, match=r"attack pgd_l2: eps must be a finite number in \[0, 10000\]"):
        attack_accuracy(parts, x, y, "pgd_l2", eps=1e30, alpha=1.0, steps=1)
    with pytest.raises(NsvitError, match="attack cw: c must be a finite number, got an integer past float's range"):
        attack_accuracy(parts, x, y, "cw", c=10 ** 400, steps=2)  # was an OverflowError
    # the building blocks called directly take the same bounds
    from nsvit_fast.eval.nullspace_metrics import exact_noise_effect
    from nsvit_fast.eval.patchfool import PatchFool

    with pytest.raises(NsvitError, match=r"scale must be a finite number in \(0, 1e\+06\]"):
        exact_noise_effect(parts, x, scale=1e20)  # matched 25%
    with pytest.raises(NsvitError, match=r"gamma must be a finite number in \(0, 1\]"):
        PatchFool(parts, gamma=2.0)
    with pytest.raises(NsvitError, match=r"lr must be a finite number in \(0, 1e\+06\]"):
        PatchFool(parts, lr=1e300)


def test_the_cli_gives_one_line_and_code_2(parts, capsys, tmp_path):
    code, out, err = cli(capsys, "eval", "--suite", "cw:kappa=1e308,steps=1", "--out", tmp_path / "ev")
    assert (code, out, err) == (2, "", "nsvit-fast: error: cw: kappa must be <= 1e+06, got 1e+308\n")
    assert not (tmp_path / "ev").exists()


def test_at_their_bounds_the_suites_still_measure(parts):
    # the bounds are not nonsense themselves: scale 1e6 keeps the nullspace exact to round-off (1e7
    # matched 81 %), an L2 step of 1e4 still attacks, and c=1e4 stays below CW's early stop
    x, y = per_class(4)
    rep = evaluate(parts, ImageDataset(x, y), ["clean", "nullspace:scale=1e6", "pgd_l2:eps=1e4,alpha=1e4,steps=1",
                                               "cw:c=1e4,steps=20"], progress=False)
    m = rep.models[0]
    clean = rep.values(m, "clean")[0]
    assert clean >= 95
    assert rep.values(m, "nullspace", metric="match_rate")[0] >= 95
    assert 0 <= rep.values(m, "nullspace", metric="mse_prob")[0] < 0.01
    assert rep.values(m, "pgd_l2")[0] < clean - 50
    assert rep.values(m, "cw")[0] < clean - 50


def test_an_attacks_n_past_the_images_is_recorded_as_the_n_attacked(parts):
    d = digits("test")
    x, y = d.images[:4], d.labels[:4]
    data = ImageDataset(x, y)
    # eps 64/255 breaks every image in AutoAttack's first pass: seconds, not minutes, for 4 images
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = evaluate(parts, data, ["autoattack:n=1000,eps=64/255"], progress=False)
    assert [r.setting for r in rep.records] == ["eps=64/255,n=4"]  # was eps=64/255,n=1000
    said = [str(m.message) for m in w if "autoattack" in str(m.message)]
    assert said == ["autoattack: n=1000 but the data holds 4 image(s): all 4 are attacked, recorded as n=4"]
    table = rep.table2()
    assert "AutoAttack (eps=64/255,n=4)" in table and "1000" not in table
    assert rep.records[0].value == 100 * attack_accuracy(parts, x, y, "autoattack", eps=64 / 255, n=4)
    # two specs that attack the same 4 images are one run: refused up front, not after the first ran
    ran = []
    with pytest.raises(NsvitError, match="suite autoattack:n=2000 is given twice"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each n is cut, with its warning, before the two are compared
        evaluate(parts, data, ["autoattack:n=1000", "autoattack:n=2000"], progress=False, log=ran.append)
    assert ran == []
    # the attack API says so too, and attacks the 4
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        acc = attack_accuracy(parts, x, y, "fgsm", n=1000, eps=8 / 255)
    assert any("n=1000 but there are 4 image(s)" in str(m.message) for m in w)
    assert acc == attack_accuracy(parts, x, y, "fgsm", eps=8 / 255)


def _partial_imagenet_c(parts, root):
    """gaussian_noise at severities 1-4 of 2 digits per class, as ImageNet-C stores it
    (<corruption>/<severity>/<class>/); severity 5 and the 14 other corruptions absent. Returns the
    accuracy (%) each folder should score: on the 8-bit pixels as written (PNG: exact)."""
    x, y = per_class(2)
    want = []
    for s in (1, 2, 3, 4):
        xc = (corrupt(x, "gaussian_noise", s) * 255).round() / 255
        for i in range(len(y)):
            folder = root / "gaussian_noise" / str(s) / str(int(y[i]))
            folder.mkdir(parents=True, exist_ok=True)
            save_pixels(xc[i], folder / f"{i}.png")
        want.append(100 * accuracy(parts, xc, y))
    return want


def test_a_partial_imagenet_c_tree_shows_its_mean_accuracy(parts, tmp_path):
    want = _partial_imagenet_c(parts, tmp_path / "c")
    assert len(set(want)) > 1 and min(want) < 100  # the severities score differently: a real mean
    x, y = per_class(1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = evaluate(parts, ImageDataset(x, y), ["clean", "imagenet-c"], progress=False,
                       folders={"imagenet-c": tmp_path / "c"})
    assert any("71 of 75" in str(m.message) and "no mCE" in str(m.message) for m in w)
    m = rep.models[0]
    assert [r.value for r in rep.records if "@" in r.setting] == [pytest.approx(a) for a in want]
    assert rep.values(m, "corruption_acc", "partial=4/75") == [pytest.approx(sum(want) / 4)]
    assert not [r for r in rep.records if r.metric == "mce"]
    table = rep.table2()
    assert "| C acc (ImageNet-C, partial 4/75) |" in table and f"{sum(want) / 4:.2f}" in table
    assert "partial 4/75) is the mean accuracy over the <corruption>/<severity> folders present" in table
    assert rep.average(m) == pytest.approx(rep.values(m, "clean")[0])  # outside the paper's Average


def test_the_cli_saves_a_partial_imagenet_c_run_alone_or_with_clean(parts, capsys, tmp_path):
    # alone it failed after scoring every folder ("the report holds no results"), the warning
    # swallowed; with clean it exited 0 with no ImageNet-C column in report.md
    want = _partial_imagenet_c(parts, tmp_path / "c")
    for suites in ("imagenet-c", "clean,imagenet-c"):
        out = tmp_path / suites.replace(",", "-")
        code, _, err = cli(capsys, "eval", "--suite", suites, "--folder", f"imagenet-c={tmp_path / 'c'}",
                           "--out", out, "--quiet")
        assert code == 0, err
        assert "71 of 75 <corruption>/<severity> folders absent" in err
        md = (out / "report.md").read_text()
        assert "C acc (ImageNet-C, partial 4/75)" in md and f"{sum(want) / 4:.2f}" in md

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

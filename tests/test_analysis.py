"""Nullspace analysis: watermark, targeted noise with saliency, the Fig. 3 / 4 / 5 studies, and
fingerprints (owner and derived copies verify, an independent model does not)."""

import json
import math

import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model, weights_fingerprint
from nsvit_fast.analysis import make_fingerprint, saliency, targeted, verify, watermark
from nsvit_fast.analysis.images import fit, logo, read_image, save_image


@pytest.fixture(scope="module")
def parts():
    return load_model("digits_vit")


def test_watermark_keeps_the_output_and_the_pixel_range(parts):
    x = digits("test").images[:8]
    mark = logo((32, 32)).expand(8, -1, -1, -1)
    r = watermark(parts, x, mark, strength=0.5)
    f = r["float"]
    assert f["predictions_match"] == 1.0 and f["logits_rel"] < 1e-5 and f["patch_embed_rel"] < 1e-5
    assert r["marked"].min() >= -0.02 and r["marked"].max() <= 1.02 and r["box_violation"] < 0.02
    assert r["psnr_to_target"] > r["psnr_target_to_image"]  # the mark shows: closer to the target than the image was
    assert r["png_8bit"]["predictions_match"] == 1.0       # still after 8-bit quantisation


def test_watermark_on_a_timm_vit_with_a_photo():
    torch.manual_seed(0)
    vit = load_model("vit_small_patch32_224", depth=1)
    x = fit(read_image("skimage:coffee"), vit.img_size)[None]
    r = watermark(vit, x, logo(vit.img_size)[None], strength=0.6)
    assert r["float"]["logits_rel"] < 1e-5 and r["psnr_to_target"] > r["psnr_target_to_image"] + 5


def test_targeted_looks_like_b_and_reads_as_a():
    torch.manual_seed(0)
    vit = load_model("vit_small_patch32_224", depth=1)
    a = fit(read_image("skimage:astronaut"), vit.img_size)[None]
    b = fit(read_image("skimage:chelsea"), vit.img_size)[None]
    r = targeted(vit, a, b)
    assert r["l2_result_to_target"] < 0.5 * r["l2_result_to_source"]  # much closer to B than to A
    assert r["logits_rel_to_source"] < 1e-5 and r["predictions_match_source"] == 1.0
    # the saliency maps follow the model, not the pixels: the result's maps are the source's
    for m in ("attention", "rollout", "gradcam", "chefer"):
        sa, sr, sb = (saliency(vit, img, m, target=vit(a).argmax(-1)) for img in (a, r["result"], b))
        assert sa.shape == (1, 7, 7) and 0 <= float(sr.min()) and float(sr.max()) <= 1
        assert (sa - sr).abs().max() < 1e-3 < (sa - sb).abs().max()


def test_saliency_maps_point_at_the_patches_the_model_uses(parts):
    # deletion check on real digits: blanking the most relevant patch costs the predicted class far
    # more probability than blanking the least relevant one
    x = digits("test").images[:64]
    with torch.no_grad():
        p0 = parts(x).softmax(-1)
    cls = p0.argmax(-1)

    def drop(m, pick):
        xx = x.clone()
        for i, k in enumerate(pick(m.flatten(1), 1).tolist()):
            r, c = divmod(k, parts.grid_size[1])
            xx[i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0
        with torch.no_grad():
            return float((p0 - parts(xx).softmax(-1)).gather(1, cls[:, None]).mean())

    for m in ("rollout", "chefer"):
        s = saliency(parts, x, m, target=cls)
        assert drop(s, torch.argmax) > 0.05 > 5 * abs(drop(s, torch.argmin)), m
    # chefer's maps depend on the class asked about; rollout's cannot
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8])
    assert (saliency(parts, x[:4], "chefer", target=a) - saliency(parts, x[:4], "chefer", target=b)).abs().max() > 0.1
    assert torch.equal(saliency(parts, x[:4], "rollout", target=a), saliency(parts, x[:4], "rollout", target=b))
    assert all(blk.attn.fused_attn for blk in parts.model.blocks)  # restored after chefer
    for m in ("chefer", "attention", "gradcam"):  # a bad input leaves no hook behind
        with pytest.raises(NsvitError, match="takes images"):
            saliency(parts, torch.rand(1, 3, 64, 64), m)
    assert not any(b.attn.attn_drop._forward_hooks or b.attn.qkv._forward_hooks or b._forward_pre_hooks
                   for b in parts.model.blocks)


def test_edits_refuse_bad_input(parts):
    x = digits("test").images[:2]
    with pytest.raises(NsvitError, match="differ in size"):
        watermark(parts, x, torch.rand(2, 3, 64, 64))
    with pytest.raises(NsvitError, match=r"pixels in \[0, 1\]"):
        targeted(parts, x * 3, x)
    with pytest.raises(NsvitError, match="no patch-embedding nullspace"):
        targeted(load_model("vit_base_patch8_224", depth=1), torch.rand(1, 3, 224, 224), torch.rand(1, 3, 224, 224))
    with pytest.raises(NsvitError, match="unknown saliency method"):
        saliency(parts, x, "lrp")


def test_fig5_properties(parts, tmp_path):
    from nsvit_fast.analysis.studies import fig5

    r = fig5(parts, digits("train"), tmp_path, m=3, n_pairs=2, lim=3.0, max_steps=400)
    assert r["m_converged"] >= 2 and r["heldout_images"] == 256  # the default, carved out of 1200
    eps, mse, heat = 0.033, r["scalar_mse_mean"], r["convex_mse"]
    assert mse[0] == 0.0 and heat[0][0] == 0.0                 # alpha = 0: no change at all
    assert max(r["scalar_mse_per_noise_at_1"]) < eps            # each noise within eps at alpha = 1
    # Fig. 5a: not closed under scaling up: growing with alpha, super-linearly past alpha ~ 1
    assert all(b > a for a, b in zip(mse, mse[1:]))
    assert mse[r["alphas"].index(2.0)] > max(4 * mse[r["alphas"].index(1.0)], 4 * eps)
    # Fig. 5b: closed under convex combination: on alpha1 + alpha2 = 1 every mix of two eps-noises
    # stays within eps, the midpoint well inside; the plain sum (alpha1 = alpha2 = 1) leaves it
    n = len(r["grid"]) - 1
    assert r["convex_line_max"] <= eps and heat[n // 2][n // 2] < 0.6 * eps and heat[n][n] > eps
    assert (tmp_path / "fig5_properties.png").stat().st_size > 5000
    assert json.loads((tmp_path / "fig5_properties.json").read_text())["eps"] == 0.033  # the paper's Sec. 5.6


def test_fig3_regularized_sweep(parts, tmp_path):
    from nsvit_fast.analysis.studies import fig3

    r = fig3(parts, digits("train"), tmp_path, lams=(0.0, 4.0), steps=60, lim=3.0)
    a, b = r["rows"]
    assert b["norm"] > a["norm"]
    # what made the numbers is in the JSON, batch 64 as `analyze fig3` (the API had fallen through to 128)
    assert r["model"] == "digits_vit" and r["model_weights"] == weights_fingerprint(parts)
    assert r["synth"]["batch_size"] == 64 and r["synth"]["lim"] == 3.0 and r["synth"]["max_steps"] == 60
    assert a["match_rate"] > a["permuted_match_rate"] and b["mse_prob"] < b["permuted_mse_prob"]
    assert (tmp_path / "fig3_regularized.png").is_file()


def test_trend_from_a_run(parts, tmp_path):
    from nsvit_fast.analysis.studies import trend
    from nsvit_fast.train import finetune

    finetune(load_model("digits_vit"), digits("train").subset(256), method="plain", rounds=2, model_steps=2,
             batch_size=32, out_dir=tmp_path / "run", val_data=digits("val"), progress=False)
    r = trend(tmp_path / "run", tmp_path / "out")
    assert r["rounds"] == 2 and len(r["series"]["val_acc"]) == 2
    with pytest.raises(NsvitError, match="no finetuning log"):
        trend(tmp_path / "nothing")
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(log.read_text()[:-20])          # a run killed mid-write
    with pytest.raises(NsvitError, match="line 2: not a JSON record"):
        trend(tmp_path / "run", tmp_path / "out")


def test_fingerprint_owner_and_copies_verify_an_independent_model_does_not(parts, tmp_path):
    from nsvit_fast.analysis.fingerprint import (Fingerprint, population_roc, pruned_copy, quantised_copy, roc_figure,
                                                 score)
    from nsvit_fast.pretrain import PretrainConfig, pretrain_digits
    from nsvit_fast.train import finetune

    fp = make_fingerprint(parts, digits("val").images, n=64)
    fp = Fingerprint.load(fp.save(tmp_path / "fp.safetensors"))
    owner = verify(parts, fp)
    assert owner["verified"] and owner["score"] < 1e-4 and owner["prediction_agreement"] == 1.0
    copy = load_model("digits_vit")
    finetune(copy, digits("train"), method="plain", rounds=1, model_steps=20, lr=1e-4, progress=False)
    assert verify(copy, fp)["verified"]
    other, _ = pretrain_digits(PretrainConfig(epochs=3, seed=1), progress=False)
    res = verify(other, fp)
    assert not res["verified"] and res["score"] > 0.5
    # the decision rule over a small population the test trains: derived vs unrelated models
    derived = {"owner": parts, "finetuned": copy, "pruned 20%": pruned_copy(parts, 0.2), "int8": quantised_copy(parts)}
    unrelated = {"seed 1": other, "seed 2": pretrain_digits(PretrainConfig(epochs=3, seed=2), progress=False)[0]}
    rows = [{"group": g, "model": k, **score(m, fp)} for g, ms in (("derived", derived), ("unrelated", unrelated))
            for k, m in ms.items()]
    roc = population_roc(rows)
    assert roc["auc"] == 1.0 and roc["true_positive_rate"] == 1.0 and roc["false_positive_rate"] == 0.0
    assert roc_figure(rows, roc, tmp_path / "roc.png").stat().st_size > 5000
    with pytest.raises(NsvitError, match="at least one derived and one unrelated"):
        population_roc(rows[:4])
    with pytest.raises(NsvitError, match="no patch-embedding nullspace"):
        make_fingerprint(load_model("vit_base_patch8_224", depth=1), torch.rand(4, 3, 224, 224))
    with pytest.raises(NsvitError, match="the suspect takes images"):
        verify(load_model("vit_tiny_patch16_224", depth=1), fp)


# -- review fixes: fig5's held-out images and pairs, the studies' own keys, trend's outputs and scale

def test_fig5_measures_on_the_images_synthesis_held_out(parts, tmp_path):
    from nsvit_fast.analysis.studies import fig5
    from nsvit_fast.data.stream import StreamingData
    from nsvit_fast.synth import synthesize

    train, val = digits("train").subset(64), digits("val").subset(12)
    kw = dict(eps=0.5, max_steps=50, lim=3.0)
    r = fig5(parts, train, tmp_path, m=2, n_pairs=1, heldout_data=val, **kw)
    bank = synthesize(parts, train, num_noises=2, seed=0, progress=False, stop="heldout", batch_size=64,
                      heldout_data=val, **kw)
    assert r["heldout_images"] == 12  # the images given, not a split of the training ones
    assert r["scalar_mse_per_noise_at_1"] == pytest.approx(bank.mse_prob.tolist(), abs=1e-6)
    # settings under which synthesis measures on its training images are refused before the descent
    with pytest.raises(NsvitError, match="fig5 measures on held-out images: stop='batch'"):
        fig5(parts, train, tmp_path, m=2, n_pairs=1, stop="batch", heldout=0, **kw)
    root = tmp_path / "imgs"
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i in range(2):
            save_image(torch.rand(3, 32, 32), root / str(c) / f"{i}.png")
    with pytest.raises(NsvitError, match="in memory"):
        fig5(parts, StreamingData(root, parts, 4), tmp_path, m=2, n_pairs=1, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig5_properties.json", "fig5_properties.png", "imgs"]


def test_fig5_pairs_are_distinct(parts, tmp_path):
    from nsvit_fast.analysis.studies import fig5

    train = digits("train").subset(64)
    r = fig5(parts, train, tmp_path, m=3, n_pairs=3, eps=0.5, max_steps=50, lim=3.0, heldout=8)
    assert r["m_converged"] == 3 and sorted(sorted(p) for p in r["pairs"]) == [[0, 1], [0, 2], [1, 2]]
    with pytest.raises(NsvitError, match="n_pairs 4 is more than the 3 distinct pairs"):
        fig5(parts, train, tmp_path / "b", m=3, n_pairs=4, eps=0.5, max_steps=50)
    assert not (tmp_path / "b").exists()


def test_studies_refuse_keys_they_set_themselves(parts, tmp_path):
    from nsvit_fast.analysis.studies import fig3, fig5

    x = digits("train").subset(64)
    with pytest.raises(NsvitError, match="fig3 sets max_steps itself: pass steps=N"):
        fig3(parts, x, tmp_path, lams=[0], steps=2, max_steps=50)
    with pytest.raises(NsvitError, match="fig3 sets progress itself"):
        fig3(parts, x, tmp_path, lams=[0], steps=2, progress=True)
    with pytest.raises(NsvitError, match="fig5 sets num_noises itself: pass m=N"):
        fig5(parts, x, tmp_path, m=2, num_noises=3, eps=0.5, max_steps=5)
    # a λ past the bound left the noise unlearned (AdamW's squared gradient overflowed) and was drawn
    with pytest.raises(NsvitError, match=r"lambda must be a finite number in \[0, 1e\+06\], got 1e\+25"):
        fig3(parts, x, tmp_path, lams=[0, 1e25], steps=2)
    from nsvit_fast.synth import synthesize_regularized

    with pytest.raises(NsvitError, match=r"lam must be a finite number in \[0, 1e\+06\]"):
        synthesize_regularized(parts, x, [1e25], steps=2, progress=False)
    assert not list(tmp_path.iterdir())


def _round_log(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_trend_checks_both_outputs_before_writing(tmp_path):
    from nsvit_fast.analysis.studies import trend

    _round_log(tmp_path / "run", [{"round": 0, "val_acc": 0.5}, {"round": 1, "val_acc": 0.6}])
    (tmp_path / "out" / "fig4_trend.json").mkdir(parents=True)
    with pytest.raises(NsvitError, match="fig4_trend.json.* is a folder"):
        trend(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out" / "fig4_trend.png").exists()  # nothing written before the refusal


def test_trend_refuses_non_finite_values(tmp_path):
    from nsvit_fast.analysis.studies import trend

    for bad in ("NaN", "Infinity"):
        (tmp_path / "log.jsonl").write_text(f'{{"round": 0, "val_acc": 0.5}}\n{{"round": 1, "mse_prob": {bad}}}\n')
        with pytest.raises(NsvitError, match=r"log.jsonl, line 2: 'mse_prob' must be a finite number, got (nan|inf)$"):
            trend(tmp_path)
    assert not (tmp_path / "fig4_trend.png").exists()


def test_trend_divides_by_the_first_rounds_value(tmp_path, monkeypatch):
    from nsvit_fast.analysis.studies import trend
    from nsvit_fast.train import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figs.append(fig) or path)
    _round_log(tmp_path, [{"round": r, "val_acc": a, "synth_steps": s}
                          for r, (a, s) in enumerate([(0.5, 0), (0.6, 10), (0.9, 20)])])
    trend(tmp_path)
    ax = figs[0].axes[0]
    drawn = {ln.get_label(): list(ln.get_ydata()) for ln in ax.lines if not ln.get_label().startswith("_")
             and len(ln.get_ydata())}
    assert drawn == {"val accuracy": pytest.approx([1.0, 1.2, 1.8])}  # steps start at 0: no first-round scale
    # rounds as log.jsonl and the tables number them (the axis started at 1)
    assert [list(ln.get_xdata()) for ln in ax.lines if ln.get_label() == "val accuracy"] == [[0, 1, 2]]
    assert "synthesis steps: not drawn (the first value is 0)" in [t.get_text() for t in ax.get_legend().texts]


def test_trend_starts_val_accuracy_at_the_starting_model(tmp_path, monkeypatch):
    """With val_acc_start in round 0's record, val accuracy is drawn from round -1 and divided by
    the starting model's value (the paper's "divided by their initial values"); the rest as before."""
    from nsvit_fast.analysis.studies import trend
    from nsvit_fast.train import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figs.append(fig) or path)
    _round_log(tmp_path, [{"round": 0, "val_acc_start": 0.4, "val_acc": 0.5, "noise_norm": 2.0},
                          {"round": 1, "val_acc": 0.6, "noise_norm": 3.0}])
    r = trend(tmp_path)
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in figs[0].axes[0].lines
             if not ln.get_label().startswith("_")}
    assert lines["val accuracy (from the start)"] == ([-1, 0, 1], pytest.approx([1.0, 1.25, 1.5]))
    assert lines["noise norm"] == ([0, 1], pytest.approx([1.0, 1.5]))
    assert r["val_acc_start"] == 0.4 and r["series"]["val_acc"] == [0.5, 0.6]
    # a starting model that scores 0 (a new head) leaves nothing to divide by: round 0's value is the scale
    figs.clear()
    _round_log(tmp_path, [{"round": 0, "val_acc_start": 0.0, "val_acc": 0.5}, {"round": 1, "val_acc": 0.6}])
    trend(tmp_path)
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in figs[0].axes[0].lines if not ln.get_label().startswith("_")}
    assert lines == {"val accuracy": pytest.approx([1.0, 1.2])}
    (tmp_path / "log.jsonl").write_text('{"round": 0, "val_acc_start": NaN}\n')
    with pytest.raises(NsvitError, match="'val_acc_start' must be a finite number"):
        trend(tmp_path)


def test_watermark_figure_of_a_zero_noise_is_not_blank(parts, tmp_path, monkeypatch):
    from nsvit_fast.analysis import apps

    panels = []
    monkeypatch.setattr(apps, "image_grid", lambda rows, path, **kw: panels.extend(rows[0]))
    r = apps.run_watermark(parts, "skimage:coffee", tmp_path / "w.png", mark="skimage:coffee", iters=5)
    noise = panels[-1][0]
    assert r["psnr_to_image"] > 60 and torch.isfinite(noise).all()  # the mark is the image: no noise to draw
    assert r["model"] == "digits_vit" and r["model_weights"] == weights_fingerprint(parts) and r["iters"] == 5


def test_watermark_size_message_gives_full_shapes(parts):
    x = digits("test").images[:2]
    with pytest.raises(NsvitError, match=r"the mark \(1, 3, 32, 32\) and the image \(2, 3, 32, 32\) differ"):
        watermark(parts, x, x[:1])


def test_read_image_refusal_has_no_data_folder_advice(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(NsvitError, match="not a readable image") as e:
        read_image(bad)
    assert "on_bad_image" not in str(e.value) and "\n" not in str(e.value)


def test_fingerprint_make_writes_nothing_its_owner_fails(parts, tmp_path, monkeypatch):
    # make saved the file before checking the owner (at --scale 1e30 the owner scored NaN, rc 0)
    import nsvit_fast.analysis.fingerprint as fpmod
    from nsvit_fast.analysis import run_fingerprint_make

    monkeypatch.setattr(fpmod, "THRESHOLD", 1e-12)  # below the owner's float32 round-off score
    with pytest.raises(NsvitError, match="does not verify against its own fingerprint"):
        run_fingerprint_make(parts, digits("val").images[:16], tmp_path / "fp.safetensors", tmp_path / "rep", n=4)
    assert not (tmp_path / "fp.safetensors").exists() and not (tmp_path / "rep" / "fingerprint_make.json").exists()
    with pytest.raises(NsvitError, match="scale must be at most 1000"):
        make_fingerprint(parts, digits("val").images[:16], n=4, scale=1e4)


def test_fingerprint_asked_for_more_challenges_than_images_says_so(parts):
    # --n 5000 on 200 images made 200 challenges without a word
    with pytest.warns(UserWarning, match="n=9 challenges asked for, but there are 6 images: 6 challenges made"):
        fp = make_fingerprint(parts, digits("val").images[:6], n=9)
    assert fp.meta["n"] == 6


def test_a_fingerprint_threshold_other_than_the_built_in_one_is_named(parts):
    # the digest is plain sha256: an editor re-signs a file with threshold 0.99, and an unrelated
    # model (score ~0.8) then verified without a word
    from nsvit_fast.analysis.fingerprint import Fingerprint, digest

    fp = make_fingerprint(parts, digits("val").images[:8], n=4)
    meta = {**fp.meta, "threshold": 0.99}
    meta["digest"] = digest(fp.images, fp.noise, fp.control, meta)
    edited = Fingerprint(fp.images, fp.noise, fp.control, meta)
    with pytest.warns(UserWarning, match="own threshold is 0.99, not the built-in 0.25"):
        assert verify(parts, edited)["threshold"] == 0.99
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verify(parts, edited, threshold=0.25)  # a threshold given: nothing to warn about
        verify(parts, fp)  # the built-in one


def test_gradient_saliency_of_a_frozen_model(parts):
    # a frozen model (no parameter requiring grad) raised torch's "does not require grad" in both
    x = digits("test").images[:4]
    want = {m: saliency(parts, x, m) for m in ("gradcam", "chefer")}
    frozen = load_model("digits_vit").requires_grad_(False)
    for m, w in want.items():
        torch.testing.assert_close(saliency(frozen, x, m), w)
    with torch.inference_mode(), pytest.raises(NsvitError, match="outside torch.inference_mode"):
        saliency(frozen, x, "gradcam")


def test_watermark_checks_its_inputs_before_the_loop(parts):
    # a str or numpy mark raised a raw AttributeError / TypeError (mark.shape read first); an image of
    # another size ran the whole Dykstra loop before invariance() refused it
    x = digits("test").images[:1]
    for bad in ("logo", x.numpy()):
        with pytest.raises(NsvitError, match="mark must be a torch tensor"):
            watermark(parts, x, bad)
    big = torch.rand(1, 3, 64, 64)
    with pytest.raises(NsvitError, match=r"takes images \(B, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        watermark(parts, big, big, iters=10**9)  # refused before the loop, or this would not end


@pytest.mark.parametrize("line2,msg", [
    ('{"round": 0, "val_acc": 0.6}', "line 2: 'round' must be 1 (records are rounds 0, 1, 2 ... in order), got '0'"),
    ('{"round": 7, "val_acc": 0.6}', "'round' must be 1"),
    ('{"round": 1' + "0" * 400 + ', "val_acc": 0.6}', "'round' must be 1"),  # an OverflowError traceback before
    ('{"round": 1, "train_loss": "big"}', "'train_loss' must be a number, got 'big'"),
    ('{"round": 1, "train_loss": NaN}', "'train_loss' must be a finite number"),
    ('{"round": 1, "val_acc": -5}', "'val_acc' must be a number in [0, 1], got -5"),
    ('{"round": 1, "synth_steps": 1.5}', "'synth_steps' must be a whole number in [0, inf], got 1.5"),
    ('{"round": 1, "noise_norm": 1' + "0" * 400 + '}', "'noise_norm' must be a finite number"),
])
def test_trend_refuses_records_finetune_never_writes(tmp_path, line2, msg):
    from nsvit_fast.analysis.studies import trend

    (tmp_path / "log.jsonl").write_text('{"round": 0, "val_acc": 0.5, "train_loss": 1.0}\n' + line2 + "\n")
    with pytest.raises(NsvitError) as e:
        trend(tmp_path)
    assert msg in str(e.value) and len(str(e.value)) < 300, str(e.value)
    assert not (tmp_path / "fig4_trend.png").exists() and not (tmp_path / "fig4_trend.json").exists()


def test_trend_names_a_gap_and_a_scale_it_cannot_draw(tmp_path, monkeypatch):
    # a null in one round dropped the whole series and its legend entry without a word; a first
    # value of 5e-324 made every ratio inf, so its entry was there with no line
    from nsvit_fast.analysis.studies import trend
    from nsvit_fast.train import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figs.append(fig) or path)
    _round_log(tmp_path, [{"round": 0, "noise_norm": 2.0, "val_acc": 5e-324},
                          {"round": 1, "noise_norm": None, "val_acc": 0.5},
                          {"round": 2, "noise_norm": 3.0, "val_acc": 0.6}])
    trend(tmp_path)
    ax = figs[0].axes[0]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.lines if not ln.get_label().startswith("_")}
    y = lines["noise norm (no value at round 1)"]
    assert y[0] == 1.0 and math.isnan(y[1]) and y[2] == 1.5
    assert "val accuracy: not drawn (the first value is 4.94066e-324)" in [t.get_text() for t in ax.get_legend().texts]


def test_invariance_of_a_model_with_a_constant_zero_output_is_a_number():
    # logits_rel was 0/0: "logits nan, predictions kept 100%" printed as a result
    from nsvit_fast.analysis.edit import invariance, max_rel

    parts = load_model("digits_vit")
    with torch.no_grad():
        parts.model.head.weight.zero_()
        parts.model.head.bias.zero_()
    x = digits("test").images[:4]
    r = invariance(parts, x, (x + 0.1).clamp(0, 1))
    assert r["logits_rel"] == 0.0 and r["patch_embed_rel"] > 0 and r["predictions_match"] == 1.0
    assert max_rel(torch.ones(2), torch.zeros(2)) == math.inf and max_rel(torch.ones(2), 2 * torch.ones(2)) == 0.5


def test_trend_ticks_are_whole_rounds(tmp_path, monkeypatch):
    from nsvit_fast.analysis.studies import trend
    from nsvit_fast.train import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figs.append(fig) or path)
    _round_log(tmp_path, [{"round": 0, "val_acc_start": 0.4, "val_acc": 0.5}, {"round": 1, "val_acc": 0.6}])
    trend(tmp_path)
    ticks = figs[0].axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks

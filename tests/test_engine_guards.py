"""Numbers the synthesis and finetuning engines report, held to what they mean: each test here
failed to notice a one-line bug that changed a reported number and nothing else. Real digits and
the embedded model."""

import warnings

import pytest
import torch

from nsvit_fast import digits, load_model
from nsvit_fast.data.batches import BatchStream
from nsvit_fast.eval.accuracy import accuracy
from nsvit_fast.synth import synthesize
from nsvit_fast.synth.engine import split_heldout
from nsvit_fast.train import finetune


@pytest.fixture(scope="module")
def train():
    return digits("train")


def test_a_stopped_noise_keeps_the_batch_mse_prob_it_stopped_on(digits_parts, train):
    """With the stop flags read every 16 steps (CUDA's default), a noise that passed at step t went
    on being measured until the next read, and later batches overwrote its batch MSE-prob (0.066
    logged for a noise that stopped at 0.028, above eps on a noise marked converged)."""
    kw = dict(lim=4.0, batch_size=64, max_steps=400, heldout=0, progress=False)
    every = {k: synthesize(digits_parts, train, check_every=k, **kw) for k in (1, 16)}
    assert bool(every[16].converged.all()) and int(every[16].steps[0]) % 16 != 15  # stopped between reads
    assert torch.equal(every[1].batch_mse_prob, every[16].batch_mse_prob)
    assert (every[16].batch_mse_prob < 0.03).all()


def test_fast_mode_takes_synth_weight_decay_as_the_reference_does(digits_parts, train):
    """Every reference-vs-fast comparison used the default 0.01: fast mode ignoring
    synth.weight_decay went unseen."""
    init = (torch.rand(1, 16, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 3
    kw = dict(batch_size=64, max_steps=12, progress=False, init=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 12 steps: not meant to reach eps
        ref = synthesize(digits_parts, train, mode="reference", weight_decay=0.5, **kw)
        fast = synthesize(digits_parts, train, mode="fast", weight_decay=0.5, **kw)
        default = synthesize(digits_parts, train, mode="fast", **kw)
    top = float(ref.noises.abs().max())
    assert (ref.noises - fast.noises).abs().max() <= 1e-5 * top
    assert (fast.noises - default.noises).abs().max() > 1e-3 * top  # the setting changes the noise at all


def test_the_boundary_schedule_fits_its_scale_on_the_held_out_images(digits_parts, train, monkeypatch):
    """schedule=boundary must search the held-out images, never the ones the noise was learned on."""
    import nsvit_fast.synth.engine as eng

    seen = []
    real = eng._to_boundary
    monkeypatch.setattr(eng, "_to_boundary", lambda p, V, held, cfg: seen.append(held) or real(p, V, held, cfg))
    synthesize(digits_parts, train, lim=3.0, schedule="boundary", batch_size=64, max_steps=600, progress=False)
    rest, held = split_heldout(train.images, 256, 0)
    assert len(seen) == 1 and torch.equal(seen[0].images.cpu(), held)
    assert len(held) == 256 and len(rest) == len(train) - 256


def test_a_batch_stream_covers_every_image_once_per_epoch():
    """When the count divides by the batch size, no full batch may be skipped: 48 images in batches
    of 16 are exactly the 48 over three batches (a > turned >= had served 32 and restarted)."""
    for n, b in ((48, 16), (50, 16)):
        s = BatchStream(n, b, seed=3)
        epoch = torch.cat([s.next() for _ in range(n // b)])
        assert len(set(epoch.tolist())) == len(epoch) == (n // b) * b
        if n % b == 0:
            assert sorted(epoch.tolist()) == list(range(n))


def test_the_models_optimiser_takes_the_configs_weight_decay(monkeypatch):
    """weight_decay read from the config but AdamW built with 0.01: nothing checked the optimiser."""
    from helpers import spy_adamw

    seen = spy_adamw(monkeypatch, "weight_decay")
    finetune(load_model("digits_vit"), digits("train").subset(64), method="plain", rounds=1, model_steps=2,
             batch_size=16, weight_decay=0.05, progress=False)
    assert seen == [0.05, 0.05]


def test_val_accuracy_scores_the_ema_weights_when_ema_runs():
    """With ema on, val_acc (and Fig. 4) must score the EMA copy, the model that is evaluated and
    saved: scoring the raw weights passed, since the EMA test had no val data."""
    val = digits("val")
    res = finetune(load_model("digits_vit"), digits("train").subset(64), method="plain", rounds=1, model_steps=3,
                   lr=0.05, batch_size=32, ema=0.5, val_data=val, progress=False)
    ema_acc = accuracy(res.eval_parts, val.images, val.labels)
    raw_acc = accuracy(res.parts, val.images, val.labels)
    assert abs(ema_acc - raw_acc) > 0.02  # the two differ here, so the record says which one it scored
    assert res.history[-1]["val_acc"] == pytest.approx(ema_acc)


def test_a_bank_round_is_converged_only_when_every_noise_is(monkeypatch):
    """noise_bank > 1: round 0 was logged converged when any one of its noises passed eps."""
    import nsvit_fast.train.engine as eng

    real = eng.synthesize

    def one_fails(*a, **kw):
        bank = real(*a, **kw)
        assert bank.converged.numel() == 3
        bank.converged[1] = False
        return bank

    monkeypatch.setattr(eng, "synthesize", one_fails)
    res = finetune(load_model("digits_vit"), digits("train").subset(256), method="ns", rounds=1, model_steps=1,
                   batch_size=16, noise_init="warm_boundary", noise_bank=3,
                   synth={"lim": 3.0, "batch_size": 48, "max_steps": 300, "heldout": 32}, progress=False)
    assert res.history[0]["converged"] is False


def test_a_noise_that_did_not_converge_is_named_by_its_round(digits_parts):
    # two rounds' "1 of 1 noise(s) did not pass the stop rule" read as one line: which round's?
    import copy
    import warnings

    from nsvit_fast import digits
    from nsvit_fast.train import finetune

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = finetune(copy.deepcopy(digits_parts), digits("train").subset(64), rounds=2, model_steps=1, batch_size=32,
                       synth={"max_steps": 1, "eps": 1e-9, "batch_size": 32, "heldout": 16}, progress=False)
    lines = [str(w.message) for w in said if "did not pass the stop rule" in str(w.message)]
    assert [ln.split(":")[0] for ln in lines] == ["round 0", "round 1"], lines
    assert [h["converged"] for h in res.history] == [False, False]

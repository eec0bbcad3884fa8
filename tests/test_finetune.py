"""Finetuning engine: every method trains, ns uses the fused 2B batch, resume after kill -9 ends
in the same weights, torchrun on 2 CPU processes matches one process, bad input is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import TORCHRUN2, free_port, wait_for_port

from nsvit_fast import NsvitError, digits, load_model
from nsvit_fast.io import load_tensors
from nsvit_fast.models import embedded
from nsvit_fast.train import METHODS, finetune
from nsvit_fast.train.engine import make_config
from nsvit_fast.train.yamlcfg import load_run
from nsvit_fast.train.methods import fused_views

FAST_SYNTH = {"lim": 3.0, "max_steps": 200, "batch_size": 64, "heldout": 64}


@pytest.fixture(scope="module")
def train():
    return digits("train").subset(512)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_runs_a_round_and_changes_the_weights(method, train, tmp_path, monkeypatch):
    import nsvit_fast.train.engine as eng

    parts = load_model("digits_vit")
    learned, used = [], []  # the round's NS noise, and the noise the method trained with
    real_synth, real_prepare = eng.synthesize, METHODS[method].prepare
    monkeypatch.setattr(eng, "synthesize", lambda *a, **kw: learned.append(real_synth(*a, **kw)) or learned[-1])
    monkeypatch.setattr(METHODS[method], "prepare", lambda self, ctx: used.append(real_prepare(self, ctx)) or used[-1])
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    res = finetune(parts, train, method=method, rounds=1, model_steps=2, lr=1e-4, batch_size=32,
                   synth=FAST_SYNTH, val_data=digits("val"), out_dir=tmp_path, progress=False)
    after = parts.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    h = res.history[0]
    assert h["round"] == 0 and 0 < h["val_acc"] <= 1 and h["train_loss"] > 0
    if method == "ns":
        assert h["noise_norm"] > 0 and h["converged"]
        assert h["noise_norm"] == pytest.approx(float(learned[0].noises[0].norm()), rel=1e-5)
        assert torch.equal(used[0], learned[0].noises[0])  # ns trains with the learned noise itself
    elif method == "random":  # a Gaussian scaled to just inside eps (random.match eps): nothing learned
        assert learned == [] and float(used[0].norm()) == pytest.approx(h["noise_norm"], rel=1e-5)
        assert h["noise_norm"] > 0 and 0.9 * 0.03 <= h["mse_prob"] < 0.03
    else:
        assert learned == [] and used == [None]
    for f in ("model.safetensors", "checkpoint.safetensors", "log.jsonl", "fig4_trend.png", "config.json"):
        assert (tmp_path / f).is_file()
    # the folder says what it ran on, not only the settings: model, data, the weights it started from
    from nsvit_fast.models import weights_fingerprint
    from nsvit_fast.train.engine import data_identity

    run = json.loads((tmp_path / "config.json").read_text())["run"]
    assert run["model"] == "digits_vit" and run["arch"] == "vit_tiny_patch16_224" and run["model_kwargs"]["depth"] == 6
    assert run["train_data"] == data_identity(train) and run["val_data"] == data_identity(digits("val"))
    assert run["start_weights"] == weights_fingerprint(load_model("digits_vit")) != weights_fingerprint(parts)
    again = load_model(checkpoint=tmp_path / "model.safetensors")
    assert torch.equal(again.model.head.weight, parts.model.head.weight)


def _ctx(parts, ns_norm: float = 5.5):
    """What a method's prepare() sees: the model, round 0 with seed 7, and an NS noise of norm ns_norm."""
    from nsvit_fast.train.methods import RoundContext

    noise = torch.ones(parts.token_shape)
    return RoundContext(parts, 0, 7, lambda: (noise * ns_norm / noise.norm(), {"noise_norm": ns_norm}))


def _sign_steps(x, start, grad_of, eps, alpha, steps):
    """L-inf PGD in pixels, by hand: from x + start, ascend grad_of(x') by sign steps of alpha,
    projected onto |x' - x| <= eps and [0, 1]."""
    xa = (x + start).clamp(0, 1)
    for _ in range(steps):
        xa.requires_grad_(True)
        g, = torch.autograd.grad(grad_of(xa), xa)
        xa = (x + (xa.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return xa


@pytest.fixture(scope="module")
def batch():
    d = digits("train")
    return d.images[:16], d.labels[:16]


def test_pgd_loss_by_hand(batch):
    # Madry: CE on L-inf PGD examples, eps 2/255, step 0.5/255, 5 steps, uniform random start
    parts, (x, y) = load_model("digits_vit"), batch
    m = METHODS["pgd"]()
    assert m.prepare(_ctx(parts)) is None
    torch.manual_seed(3)
    loss = m.loss(parts, x, y, None)[0].detach()
    torch.manual_seed(3)
    start = torch.empty_like(x).uniform_(-2 / 255, 2 / 255)
    xa = _sign_steps(x, start, lambda xx: F.cross_entropy(parts(xx), y), 2 / 255, 0.5 / 255, 5)
    assert float((xa - x).abs().max()) == pytest.approx(2 / 255, rel=1e-5)
    with torch.no_grad():
        want, clean = F.cross_entropy(parts(xa), y), F.cross_entropy(parts(x), y)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(want) > 1.5 * float(clean)  # the examples are adversarial


def test_trades_loss_by_hand(batch):
    # TRADES: CE(f(x), y) + 6 KL(f(x) || f(x_adv)), x_adv maximising that KL (TPGD: start x + 0.001 N(0, 1))
    parts, (x, y) = load_model("digits_vit"), batch
    m = METHODS["trades"]()
    m.prepare(_ctx(parts))
    torch.manual_seed(4)
    loss, terms = m.loss(parts, x, y, None)
    loss = loss.detach()
    with torch.no_grad():
        p = parts(x).softmax(-1)

    def kl(xx):  # KL(p || f(xx)), summed over the batch
        return (p * (p.log() - parts(xx).log_softmax(-1))).sum()

    torch.manual_seed(4)
    xa = _sign_steps(x, 0.001 * torch.randn_like(x), kl, 2 / 255, 0.5 / 255, 5)
    with torch.no_grad():
        ce, kl_mean = F.cross_entropy(parts(x), y), kl(xa) / x.shape[0]
    assert float(terms["kl_adv"]) == pytest.approx(float(kl_mean), rel=1e-4) and float(kl_mean) > 0
    assert float(loss) == pytest.approx(float(ce + 6.0 * kl_mean), rel=1e-5)


def test_random_noise_norm_and_loss_by_hand(batch):
    # Gaussian tokens noise with the round's NS norm (or random_norm), trained with the ns loss
    parts, (x, y) = load_model("digits_vit"), batch
    m = METHODS["random"](make_config(None, {"random.match": "norm"}).random)
    v = m.prepare(_ctx(parts))
    assert v.shape == parts.token_shape and float(v.norm()) == pytest.approx(5.5, rel=1e-6)
    r = torch.randn(parts.token_shape, generator=torch.Generator().manual_seed(7))  # seeded by the round
    assert torch.allclose(v, r * 5.5 / r.norm(), atol=1e-6)
    fixed = METHODS["random"](make_config(None, {"random.match": "norm", "random.norm": 2.0}).random)
    assert float(fixed.prepare(_ctx(parts)).norm()) == pytest.approx(2.0, rel=1e-6)
    loss = m.loss(parts, x, y, v)[0].detach()
    with torch.no_grad():
        u = parts.patch_embed(x)
        want = F.cross_entropy(parts.encode(u), y) + F.cross_entropy(parts.encode(u + v), y)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_ns_uses_one_fused_2b_batch(monkeypatch):
    parts = load_model("digits_vit")
    x, y = digits("train").images[:16], digits("train").labels[:16]
    v = torch.randn(16, 96)
    import nsvit_fast.ops as ops

    seen = {"patch_embed": [], "assembled_rows": []}
    pe, ta = type(parts).patch_embed, ops.token_assembly

    def assembly(*a, **kw):
        out = ta(*a, **kw)
        seen["assembled_rows"].append(out[0].shape[0])
        return out

    monkeypatch.setattr(type(parts), "patch_embed", lambda s, t: seen["patch_embed"].append(t.shape[0]) or pe(s, t))
    monkeypatch.setattr(ops, "token_assembly", assembly)
    loss, _ = METHODS["ns"]().loss(parts, x, y, v)
    # one patch embedding of B images, one token assembly of 2B rows (clean + noisy) for one encoder pass
    assert seen == {"patch_embed": [16], "assembled_rows": [32]}
    monkeypatch.undo()
    # and it is the same loss, with the same gradient, as the official two forwards
    g_fused = torch.autograd.grad(loss, list(parts.parameters()))
    u1, u2 = parts.patch_embed(x), parts.patch_embed(x)
    loss2 = F.cross_entropy(parts.encode(u1), y) + F.cross_entropy(parts.encode(u2 + v), y)
    g_two = torch.autograd.grad(loss2, list(parts.parameters()))
    assert torch.allclose(loss, loss2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_fused, g_two))
    z, zn = fused_views(parts, x, v)
    assert torch.allclose(zn, parts.encode(parts.patch_embed(x) + v), atol=1e-5)


def test_each_round_draws_its_own_noise(train, monkeypatch):
    """Algorithm 1 draws a fresh U(-lim, lim) noise every round: each round's synthesis gets its own
    seed, (seed * 100003 + k) mod 2**32 (one seed for all rounds repeated one start and batch order)."""
    import nsvit_fast.train.engine as eng

    seeds = []
    real = eng.synthesize

    def spy(parts, data, cfg, *a, **kw):
        seeds.append(cfg.seed)
        return real(parts, data, cfg, *a, **kw)

    monkeypatch.setattr(eng, "synthesize", spy)
    res = finetune(load_model("digits_vit"), train, rounds=3, model_steps=1, batch_size=32, lr=1e-4, seed=7,
                   synth=FAST_SYNTH, progress=False)
    assert seeds == [7 * 100_003, 7 * 100_003 + 1, 7 * 100_003 + 2]
    norms = [h["noise_norm"] for h in res.history]
    assert len(set(norms)) == 3  # three draws, not one repeated


def test_model_steps_run_in_train_mode_and_synthesis_in_eval_mode(train, monkeypatch):
    """drop-path / dropout are part of finetuning (timm's train.py) and not of the noise's ε test:
    the model is in train mode at every step and in eval mode while its noise is learned (the
    digits model has neither, so only a model with drop-path shows a wrong mode)."""
    import nsvit_fast.train.engine as eng
    from nsvit_fast.models import create_model
    from nsvit_fast.train.methods.ns import NS

    parts = create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8, num_classes=10,
                         drop_path_rate=0.1)
    modes = {"step": [], "synth": []}
    real_loss, real_synth = NS.loss, eng.synthesize

    def loss(self, p, *a, **kw):
        modes["step"].append(p.training)
        return real_loss(self, p, *a, **kw)

    def synth(p, *a, **kw):
        modes["synth"].append(p.training)
        return real_synth(p, *a, **kw)

    monkeypatch.setattr(NS, "loss", loss)
    monkeypatch.setattr(eng, "synthesize", synth)
    finetune(parts, train.subset(64), rounds=2, model_steps=3, batch_size=16, lr=1e-4,
             synth={**FAST_SYNTH, "max_steps": 3, "heldout": 16}, progress=False)
    assert modes == {"step": [True] * 6, "synth": [False] * 2}


def test_warm_start_scales_the_previous_noise(train, monkeypatch):
    import nsvit_fast.train.engine as eng

    inits = []
    real = eng.synthesize

    def spy(*a, init=None, **kw):
        inits.append(None if init is None else init.clone())
        return real(*a, init=init, **kw)

    monkeypatch.setattr(eng, "synthesize", spy)
    res = finetune(load_model("digits_vit"), train, rounds=3, model_steps=1, batch_size=32, lr=1e-4,
                   noise_init="warm", warm_growth=1.25, synth=FAST_SYNTH, progress=False)
    assert inits[0] is None and inits[1] is not None and inits[2] is not None
    assert inits[1].norm().item() == pytest.approx(1.25 * res.history[0]["noise_norm"], rel=1e-4)


def test_warm_boundary_starts_from_the_last_noise_grown_to_eps(train, monkeypatch):
    import nsvit_fast.train.engine as eng

    calls = []
    real = eng.synthesize

    def spy(parts, data, cfg, *a, init=None, **kw):
        calls.append((None if init is None else init.clone(), cfg.init_scale))
        return real(parts, data, cfg, *a, init=init, **kw)

    monkeypatch.setattr(eng, "synthesize", spy)
    res = finetune(load_model("digits_vit"), train, rounds=3, model_steps=2, batch_size=32, lr=1e-4,
                   noise_init="warm_boundary", synth=FAST_SYNTH, progress=False)
    assert calls[0] == (None, "none")  # round 0 is Algorithm 1's fresh draw
    h = res.history
    for k in (1, 2):
        init, scale = calls[k]
        assert scale == "boundary"
        assert init.norm().item() == pytest.approx(h[k - 1]["noise_norm"], rel=1e-5)  # the last noise, unscaled
        # the drift of the last noise on the updated model, and the growth found for it, are logged
        assert 0 <= h[k]["init_mse_prob"] < 1
        assert h[k]["init_scale_factor"] >= 1.25 - 1e-6  # grown to ε, and at least by warm_growth
        if h[k]["synth_steps"] == 0:  # passed at once: the round's noise is the grown one
            assert h[k]["noise_norm"] == pytest.approx(h[k]["init_scale_factor"] * init.norm().item(), rel=1e-4)


def test_warm_max_growth_caps_the_noise_norm(train, monkeypatch):
    """warm_max_growth=1.3: each round's grown start is at most 1.3x round 0's norm; without the cap
    the x1.25 floor would compound to 1.56x by round 2, so the cap must bind at least once."""
    import nsvit_fast.train.engine as eng

    calls = []
    real = eng.synthesize

    def spy(parts, data, cfg, *a, init=None, **kw):
        calls.append(None if init is None else float(init.norm()))
        return real(parts, data, cfg, *a, init=init, **kw)

    monkeypatch.setattr(eng, "synthesize", spy)
    res = finetune(load_model("digits_vit"), train, rounds=4, model_steps=2, batch_size=32, lr=1e-4,
                   noise_init="warm_boundary", warm_max_growth=1.3, synth=FAST_SYNTH, progress=False)
    h, cap = res.history, 1.3 * res.history[0]["noise_norm"]
    starts = [h[k]["init_scale_factor"] * calls[k] for k in (1, 2, 3)]  # the grown noise each round starts from
    assert all(s <= cap * (1 + 1e-5) for s in starts), (starts, cap)
    assert any(s == pytest.approx(cap, rel=1e-5) for s in starts), (starts, cap)
    with pytest.raises(NsvitError, match="warm_max_growth must be >= 0"):
        finetune(load_model("digits_vit"), train, rounds=1, noise_init="warm_boundary", warm_max_growth=-1.0,
                 progress=False)


def test_noise_bank_learns_m_noises_once_and_uses_them_in_turn(train, monkeypatch, tmp_path):
    """noise_bank=3: round 0 is one batched descent of 3 fresh draws, each on batch_size // 3 images;
    round k starts from noise k mod 3 as the bank last held it, capped at warm_max_growth x that
    noise's own round-0 norm, and writes the result back. A run stopped after round 2 and resumed
    from its checkpoint ends in the same weights as one that ran through."""
    import nsvit_fast.train.engine as eng

    calls = []
    real = eng.synthesize

    def spy(parts, data, cfg, *a, init=None, **kw):
        bank = real(parts, data, cfg, *a, init=init, **kw)
        calls.append(dict(m=cfg.num_noises, batch=cfg.batch_size, init=None if init is None else init.clone(),
                          cap=cfg.init_max_scale, out=bank.noises.clone()))
        return bank

    monkeypatch.setattr(eng, "synthesize", spy)
    kw = dict(rounds=5, model_steps=2, batch_size=32, lr=1e-4, noise_init="warm_boundary", noise_bank=3,
              warm_max_growth=1.3, synth=FAST_SYNTH, progress=False)
    res = finetune(load_model("digits_vit"), train, out_dir=tmp_path / "ref", **kw)
    h = res.history
    assert (calls[0]["m"], calls[0]["batch"], calls[0]["init"]) == (3, FAST_SYNTH["batch_size"] // 3, None)
    assert [c["m"] for c in calls[1:]] == [1] * 4 and [r["bank_member"] for r in h] == [0, 1, 2, 0, 1]
    bank = calls[0]["out"].clone()
    assert len({round(float(v.norm()), 3) for v in bank}) == 3  # three different draws
    assert h[0]["bank_norms"] == pytest.approx([float(v.norm()) for v in bank], rel=1e-5)
    for k in range(1, 5):
        j = k % 3
        assert torch.equal(calls[k]["init"], bank[j])  # the bank's noise j as it last was
        assert calls[k]["cap"] == pytest.approx(1.3 * h[0]["bank_norms"][j] / float(bank[j].norm()), rel=1e-5)
        bank[j] = calls[k]["out"][0]
    # stopped at the start of round 3 (its checkpoint holds the bank), then resumed
    def stop(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return spy(*a, **k)

    calls.clear()
    monkeypatch.setattr(eng, "synthesize", stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_model("digits_vit"), train, out_dir=tmp_path / "run", **kw)
    monkeypatch.setattr(eng, "synthesize", spy)
    again = finetune(load_model("digits_vit"), train, out_dir=tmp_path / "run", resume=True, **kw)
    assert [r["bank_member"] for r in again.history] == [0, 1, 2, 0, 1]
    a, b = res.parts.state_dict(), again.parts.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(NsvitError, match="noise_bank 2 needs noise_init warm_boundary"):
        finetune(load_model("digits_vit"), train, rounds=1, noise_bank=2, progress=False)
    with pytest.raises(NsvitError, match="noise_bank must be >= 1"):
        finetune(load_model("digits_vit"), train, rounds=1, noise_init="warm_boundary", noise_bank=0,
                 progress=False)
    # a whole float from the API is stored as the int it stands for (noise k mod M indexes a tensor)
    from nsvit_fast.train.engine import make_config
    cfg = make_config(None, {"noise_init": "warm_boundary", "noise_bank": 2.0, "rounds": 3.0})
    assert type(cfg.noise_bank) is int and type(cfg.rounds) is int and (cfg.noise_bank, cfg.rounds) == (2, 3)


def test_ema_and_tensorboard(train, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    parts = load_model("digits_vit")
    ema = [p.detach().clone() for p in parts.parameters()]
    steps = []  # the weights after every optimiser step
    hook = register_optimizer_step_post_hook(lambda *_: steps.append([p.detach().clone() for p in parts.parameters()]))
    try:
        res = finetune(parts, train, method="plain", rounds=2, model_steps=3, lr=1e-3, batch_size=32, ema=0.5,
                       tensorboard=True, out_dir=tmp_path, progress=False)
    finally:
        hook.remove()
    assert len(steps) == 6
    for w in steps:  # by hand: e <- d e + (1 - d) w after each step, from the starting weights
        ema = [0.5 * e + 0.5 * p for e, p in zip(ema, w)]
    saved = load_model(checkpoint=tmp_path / "model_ema.safetensors")
    for e, got, w in zip(ema, saved.parameters(), steps[-1]):
        assert torch.allclose(got, e, atol=1e-6) and not torch.equal(got, w)
    assert res.eval_parts is not parts
    assert all(torch.equal(a, b) for a, b in zip(res.eval_parts.parameters(), saved.parameters()))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_headline_config_measures_lim_in_token_rms():
    # configs/digits.yaml as shipped (lim 6 x the RMS of the clean patch tokens, fresh noise, eps 0.03),
    # with the budget cut to one model step and 20 synthesis steps
    run, cfg = load_run("digits", {"rounds": 1, "model_steps": 1, "synth.max_steps": 20})
    assert (run["model"], run["data"], cfg.method, cfg.noise_init) == ("digits_vit", "digits:train", "ns", "fresh")
    assert (cfg.synth.lim_unit, cfg.synth.lim, cfg.synth.eps, cfg.synth.batch_size) == ("token_rms", 6.0, 0.03, 128)
    parts, data = load_model(run["model"]), digits("train")
    with torch.no_grad():
        rms = float(parts.patch_embed(data.images).pow(2).mean().sqrt())
    h = finetune(parts, data, cfg, progress=False).history[0]
    # lim in absolute units is 6 x the RMS (0.77; measured on the synthesis images, a subset here)
    assert rms == pytest.approx(0.77, abs=0.01) and h["lim"] == pytest.approx(6 * rms, rel=0.02)
    # from there the noise starts far outside eps: 20 steps do not reach it (the full run takes ~300)
    assert not h["converged"] and h["synth_steps"] == 20 and h["mse_prob"] > 3 * 0.03


@pytest.mark.slow
def test_ns_finetuning_makes_the_model_robust_to_its_noise(monkeypatch):
    # the method's effect, pinned on one short seeded run against plain finetuning (same data, steps,
    # lr, seed): ns trains on its learned nullspace noise, so the finetuned model tolerates that noise
    # scaled past eps far better than plain does, and it is as robust to FGSM at 4/255.
    # Measured (seeds 0 / 1, 397 test digits): accuracy with 2 x the round-0 noise 0.82 / 0.68 (ns)
    # against 0.68 / 0.49 (plain); FGSM 4/255 0.87 / 0.81 against 0.82 / 0.80 (level within noise)
    import nsvit_fast.train.engine as eng
    from nsvit_fast.eval import attack_accuracy

    learned = []
    real = eng.synthesize
    monkeypatch.setattr(eng, "synthesize", lambda *a, **kw: learned.append(real(*a, **kw)) or learned[-1])
    test, models = digits("test"), {}
    for method in ("ns", "plain"):
        models[method] = finetune(load_model("digits_vit"), digits("train").subset(512), method=method, rounds=2,
                                  model_steps=25, batch_size=64, lr=5e-4, noise_init="fresh", seed=0,
                                  synth=FAST_SYNTH, progress=False).parts
    v = learned[0].noises[0]  # round 0's noise, learned on the pretrained model

    def acc(p, scale):
        with torch.no_grad():
            return float((p.encode(p.patch_embed(test.images) + scale * v).argmax(-1) == test.labels).float().mean())

    ns, plain = models["ns"], models["plain"]
    assert acc(ns, 2.0) > acc(plain, 2.0) + 0.08
    assert acc(ns, 0.0) >= acc(plain, 0.0) - 0.01  # no price in clean accuracy
    fgsm = [attack_accuracy(m, test.images, test.labels, "fgsm", eps=4 / 255) for m in (ns, plain)]
    assert fgsm[0] >= fgsm[1] - 0.01


def _run_cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "nsvit_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


RESUME_ARGS = ["finetune", "--config", "digits", "--quiet", "rounds=3", "model_steps=4", "batch_size=32",
               "checkpoint_every=2", "noise_init=warm", "synth.lim=3", "synth.lim_unit=abs", "synth.max_steps=200",
               "synth.batch_size=64", "synth.heldout=64", "val_data=null", "max_images=256"]


def test_resume_after_kill_ends_in_the_same_weights(tmp_path):
    # the uninterrupted run and the one to kill side by side (one thread each): bitwise equal either way
    ref = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "ref"))
    run = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    t0 = time.time()
    while not ckpt.exists() and run.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the run, after the first checkpoint
    assert run.poll() is None, "the run finished before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    progress = load_tensors(ckpt)[1]["progress"]
    assert (progress["round"], progress["step"]) < (3, 0)
    # without --resume the folder is protected
    again = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "run"))
    assert again.wait(timeout=300) == 2 and "resume" in again.stderr.read()
    res = _run_cli(*RESUME_ARGS, "--out", str(tmp_path / "run"), "--resume")
    assert res.wait(timeout=600) == 0, res.stderr.read()
    a, _ = load_tensors(tmp_path / "ref" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1, 2]
    # the logged numbers too (a mid-round resume that lost the round's losses logged the rest's mean)
    ref_log = [json.loads(line) for line in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(ref_log, log):
        keys = [k for k in a if (k.startswith(("train_", "val_")) or k in ("noise_norm", "mse_prob", "synth_steps"))
                and isinstance(a[k], (int, float))]
        assert len(keys) >= 4 and {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-9), keys


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    # tests/_ddp_run.py records, inside each process, the world size, the global batch the engine drew
    # and the rows this rank trained on, and saves each rank's final weights
    script = os.path.join(os.path.dirname(__file__), "_ddp_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
    one = subprocess.run([sys.executable, script, str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*TORCHRUN2, script, str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "rank0.json").read_text())
    r = [json.loads((tmp_path / "two" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert r1["world"] == 1 and [x["world"] for x in r] == [2, 2] and [x["rank"] for x in r] == [0, 1]
    # every rank draws the single-process global batch and trains on its own half of it
    assert len(r1["steps"]) == len(r[0]["steps"]) == len(r[1]["steps"]) == 6
    for s1, a, b in zip(r1["steps"], r[0]["steps"], r[1]["steps"]):
        assert s1["global"] == a["global"] == b["global"] and s1["mine"] == s1["global"]
        assert a["rows"] == b["rows"] == 16 and len(a["mine"]) == len(b["mine"]) == 16
        assert not set(a["mine"]) & set(b["mine"]) and sorted(a["mine"] + b["mine"]) == sorted(s1["global"])
    # the ranks saw different data yet end in the same weights: the gradients were all-reduced
    w0, _ = load_tensors(tmp_path / "two" / "rank0.safetensors")
    w1, _ = load_tensors(tmp_path / "two" / "rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # the same noise search on every rank (noise gradient and stop statistic averaged) and as in one process
    h1, h2 = r1["history"], r[0]["history"]
    assert [h["noise_norm"] for h in r[1]["history"]] == [h["noise_norm"] for h in h2]
    assert [h["synth_steps"] for h in h1] == [h["synth_steps"] for h in h2]
    # the logged loss is the global batch's on every rank (it was rank 0's half: 2.261 against 2.296)
    assert [h["train_loss"] for h in r[1]["history"]] == [h["train_loss"] for h in h2]
    assert [h["train_loss"] for h in h2] == pytest.approx([h["train_loss"] for h in h1], rel=1e-4)
    assert [h["noise_norm"] for h in h1] == pytest.approx([h["noise_norm"] for h in h2], rel=1e-4)
    # averaged half-batch gradients are the full-batch gradient: nearly the one-process weights, only
    # the order of float reductions differs. Adam turns a round-off difference in a near-zero gradient
    # element into a step of up to ~lr (1e-4 here), so the bound is lr per step (6 steps)
    a, _ = load_tensors(tmp_path / "one" / "rank0.safetensors")
    diff = torch.cat([(a[k] - w0[k]).abs().flatten() for k in a])
    assert float(diff.max()) <= 6 * 1e-4
    assert float(diff.mean()) < 1e-6


def test_ranks_take_the_same_synthesis_decisions_on_different_held_out_sums(tmp_path):
    # each rank measures on other held-out images (a GPU's sums need not agree to the last bit); without
    # the held-out numbers averaged across ranks, a rank left the descent at its confirmation while the
    # other stepped on into an all-reduce (gloo: connection closed; nccl: a hang), and the secant and walk
    # growth searches picked a scale per rank (noise norms 25.1 against 28.1 and 33.0)
    script = os.path.join(os.path.dirname(__file__), "_rank_agree.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
    two = subprocess.run([*TORCHRUN2, script, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, _ = load_tensors(tmp_path / "rank0.safetensors")
    b, _ = load_tensors(tmp_path / "rank1.safetensors")
    assert sorted(a) == sorted(b) == sorted(["boundary", "secant", "walk", "boundary_steps", "secant_steps",
                                             "walk_steps", "eps_scale"])
    assert int(a["boundary_steps"][0]) > 0  # the descent ran and was confirmed on held-out images
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_attack_random_starts_differ_per_rank_and_the_generators_stay_in_step(monkeypatch):
    # every rank is seeded alike, so torchattacks' PGD / TPGD drew one random start for all ranks'
    # different slices of the batch; now each draws its own, and the shared generator (the checkpoint
    # keeps rank 0's for all) advances alike on every rank
    import nsvit_fast.distributed as dist_util
    from nsvit_fast.train.methods.base import own_draws_per_rank

    def draw(x):
        return x + torch.empty_like(x).uniform_(-1, 1)  # as torchattacks' random start

    x = torch.zeros(4, 3)
    out, after = {}, {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        monkeypatch.setattr(dist_util, "rank_world", lambda r=rank, w=world: (r, w))
        torch.manual_seed(5)
        out[rank, world] = own_draws_per_rank(draw, x)
        after[rank, world] = torch.get_rng_state()
    torch.manual_seed(5)
    assert torch.equal(out[0, 1], draw(x))  # one process: unchanged, on the shared generator
    assert not torch.equal(out[0, 2], out[1, 2])  # two ranks: their own starts
    assert torch.equal(after[0, 2], after[1, 2])  # ... and generators in step
    # and the two methods with a random start make their attacks through it
    import nsvit_fast.train.methods.pgd as pgd_mod
    import nsvit_fast.train.methods.trades as trades_mod

    monkeypatch.setattr(dist_util, "rank_world", lambda: (0, 1))
    for mod, method in ((pgd_mod, "pgd"), (trades_mod, "trades")):
        calls = []
        monkeypatch.setattr(mod, "own_draws_per_rank", lambda fn, *a: calls.append(fn) or fn(*a))
        finetune(load_model("digits_vit"), digits("train").subset(16), method=method, rounds=1, model_steps=1,
                 batch_size=8, device="cpu", progress=False, **{method: {"steps": 1}})
        assert len(calls) == 1, method


def test_dropout_masks_differ_per_rank_and_every_step_draws_through_the_fork(monkeypatch):
    # every rank is seeded alike, so a model with dropout drew the same masks on every rank for
    # their different slices of the batch; the step now runs the loss on a per-rank fork
    import nsvit_fast.distributed as dist_util
    import nsvit_fast.train.engine as engine_mod
    from nsvit_fast.models import create_model
    from nsvit_fast.train.engine import _LossModule

    torch.manual_seed(0)
    parts = create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                         num_heads=2, drop_rate=0.3)
    parts.train()
    step = _LossModule(parts, METHODS["plain"]())
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    loss, after = {}, {}
    for rank in (0, 1):
        monkeypatch.setattr(dist_util, "rank_world", lambda r=rank: (r, 2))
        torch.manual_seed(5)
        loss[rank] = engine_mod.own_draws_per_rank(step, x, y, None)[0]
        after[rank] = torch.get_rng_state()
    assert not torch.equal(loss[0], loss[1])  # other masks on the same images
    assert torch.equal(after[0], after[1])
    monkeypatch.setattr(dist_util, "rank_world", lambda: (0, 1))
    calls = []
    monkeypatch.setattr(engine_mod, "own_draws_per_rank", lambda fn, *a: calls.append(fn) or fn(*a))
    finetune(parts, digits("train").subset(16), method="plain", rounds=1, model_steps=3, batch_size=8,
             progress=False)
    assert len(calls) == 3 and all(isinstance(fn, _LossModule) for fn in calls)


def test_the_largest_seed_runs_a_round_of_synthesis():
    # round k's synthesis seed was seed * 100003 + k, past the 2**32 - 1 synthesis accepts from seed 42949 on
    from nsvit_fast import digits, load_model
    from nsvit_fast.train import finetune

    res = finetune(load_model("digits_vit"), digits("train"), rounds=1, model_steps=1, batch_size=8,
                   seed=2**32 - 1, device="cpu", progress=False, synth={"max_steps": 2, "batch_size": 8})
    assert res.history[0]["synth_steps"] >= 1


def test_ranks_started_by_hand_meet_without_torchrun(tmp_path):
    # srun or a script sets RANK / WORLD_SIZE / MASTER_* itself; rank 1 here waits for rank 0's port,
    # which torch's own client would do with a C++ warning and frames on every refused connect
    port = free_port()
    code = ("import sys, torch, torch.distributed as dist\n"
            "from nsvit_fast.distributed import init_from_env, all_mean, check_same, rank_world\n"
            "print('joining', flush=True)\n"
            "assert init_from_env('cpu')\n"
            "check_same('settings', {'lr': 1e-4})\n"
            "print(*rank_world(), float(all_mean(torch.tensor([rank_world()[0] + 1.0]))[0]), flush=True)\n"
            "dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               NSVIT_JOIN_TIMEOUT="120")
    ranks = {}
    for r in (1, 0):
        ranks[r] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**env, "RANK": str(r)})
        assert ranks[r].stdout.readline().strip() == "joining", ranks[r].stderr.read()
        time.sleep(1)  # rank 1 is knocking on a closed port before rank 0 opens it
    for r, p in ranks.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and out.split() == [str(r), "2", "1.5"], (out, err[-2000:])
        assert "TCPStore" not in err and "client failed" not in err, err[-2000:]


def test_a_rank_that_leaves_the_join_is_counted_out_and_a_rank_started_twice_stops_all(tmp_path):
    # without the count going back down, the two left would start without the third and wait in
    # C++ for 30 minutes; a restarted rank was then refused as "started twice"
    from datetime import timedelta

    import torch.distributed as dist

    code = ("import signal, torch, torch.distributed as dist\n"  # Ctrl-C even where the test runs in the background
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # (a shell's & starts it ignored)
            "from nsvit_fast.distributed import init_from_env, all_mean, rank_world\n"
            "from nsvit_fast import NsvitError\n"
            "try:\n    init_from_env('cpu')\nexcept NsvitError as e:\n    print(e, flush=True)\n    raise SystemExit(2)\n"
            "print(*rank_world(), float(all_mean(torch.tensor([rank_world()[0] + 1.0]))[0]), flush=True)\n"
            "dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.update(WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", NSVIT_JOIN_TIMEOUT="300")

    def rank(r: int, port: int):
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**env, "RANK": str(r), "MASTER_PORT": str(port)})

    def joined(store, n: int) -> None:
        t0 = time.time()
        while store.add("nsvit/joined", 0) != n:
            assert time.time() - t0 < 120, store.add("nsvit/joined", 0)
            time.sleep(0.1)

    port = free_port()
    r0, r1 = rank(0, port), rank(1, port)
    t0 = time.time()
    while True:  # rank 0's store, read from here as one more client
        try:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
            break
        except RuntimeError:
            assert time.time() - t0 < 120 and r0.poll() is None, r0.stderr.read() if r0.poll() is not None else ""
            time.sleep(0.2)
    joined(store, 2)
    r1.send_signal(signal.SIGINT)  # Ctrl-C in rank 1's wait
    assert r1.wait(timeout=60) != 0
    joined(store, 1)
    r1, r2 = rank(1, port), rank(2, port)  # rank 1 again: welcome, not "started twice"
    for r, p in enumerate((r0, r1, r2)):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and out.split() == [str(r), "3", "2.0"], (r, out, err[-2000:])
    del store

    port = free_port()  # ranks 0, 1, 1 of 3: the second 1 is refused, and the two waiting with it stop
    ranks = [rank(0, port)]
    wait_for_port(port, ranks[0])
    ranks.append(rank(1, port))
    time.sleep(3)
    ranks.append(rank(1, port))
    outs = [p.communicate(timeout=120)[0].strip() for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2, 2], outs
    assert all("RANK=1 was started twice" in o for o in outs), outs


@pytest.mark.parametrize("kw,msg", [
    (dict(method="magic"), "unknown method 'magic'"), (dict(rounds=0), "rounds must be"),
    (dict(roundz=3), "did you mean 'rounds'"), (dict(synth={"epz": 1}), "did you mean 'eps'"),
    (dict(noise_init="hot"), "noise_init"), (dict(**{"synth.eps": -1}), "eps must be"),
])
def test_bad_config(train, kw, msg):
    with pytest.raises(NsvitError, match=msg):
        finetune(load_model("digits_vit"), train, progress=False, **kw)


def test_checkpoint_from_another_run_is_refused(train, tmp_path):
    finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=1, batch_size=32,
             out_dir=tmp_path, progress=False)
    with pytest.raises(NsvitError, match="another run"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=1, batch_size=32,
                 out_dir=tmp_path, progress=False)
    with pytest.raises(NsvitError, match="belongs to another run.*lr"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=1, batch_size=32,
                 lr=1.0, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(NsvitError, match=r"config key 'synth.eps': 0.03 there, 0.5 here\); to resume it give its "
                                         r"settings \(synth.eps=0.03; its config.json holds them all\), or use another "
                                         r"--out$"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=1, batch_size=32,
                 synth={"eps": 0.5}, out_dir=tmp_path, resume=True, progress=False)  # the key, not both dicts
    # every differing key is named, with the settings that would resume (one key a try, and "use
    # another --out" was the only advice)
    with pytest.raises(NsvitError, match=r"\(config key 'model_steps': 1 there, 2 here; 1 more: lr\); to "
                                         r"resume it give its settings \(model_steps=1 lr=1e-05;"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=1, model_steps=2, batch_size=32,
                 lr=0.5, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(NsvitError, match="belongs to another run.*model"):
        finetune(load_model(embedded.ARCH, **{**embedded.KWARGS, "depth": 4}),
                 train, method="plain", rounds=1, model_steps=1, batch_size=32, out_dir=tmp_path, resume=True,
                 progress=False)


def test_a_diverging_run_stops_before_it_writes_a_nan_model(train, tmp_path):
    """lr 1e30 overflows the weights in the first step: the round's end refuses NaN weights, so no
    checkpoint or model.safetensors holding them is written."""
    with pytest.raises(NsvitError, match="training diverged in round 0"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=2, model_steps=2, batch_size=32, lr=1e30,
                 out_dir=tmp_path, progress=False)
    # stopped before its first checkpoint: nothing to resume, so not even config.json is left
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".nsvit.lock") == []


def test_yaml_reads_exponent_floats_as_numbers(tmp_path):
    """PyYAML alone reads 1e-4 as a string (it wants 1.0e-4); learning rates are written that way."""
    from nsvit_fast.train.yamlcfg import parse_overrides

    assert parse_overrides(["lr=1e-4", "synth.eps=3E-2", "rounds=3", "out=run1e5"]) == \
        {"lr": 1e-4, "synth.eps": 0.03, "rounds": 3, "out": "run1e5"}
    (tmp_path / "c.yaml").write_text("lr: 2e-4\nweight_decay: 5e-2\nrounds: 2\n")
    _, cfg = load_run(str(tmp_path / "c.yaml"))
    assert (cfg.lr, cfg.weight_decay, cfg.rounds) == (2e-4, 0.05, 2)


def test_yaml_reads_integers_and_keys_as_yaml_1_2_and_expands_home(tmp_path, monkeypatch):
    """YAML 1.1 (PyYAML) reads 1_0 as 10 and 010 as 8, and keeps the last of two equal keys (a second
    `synth:` block replaced the first); paths with ~ landed in a folder named ~."""
    from nsvit_fast.train.yamlcfg import find_config, load_yaml

    assert load_yaml("a: 10\nb: -3\nc: 0x10\nd: 1_0\ne: 010") == {"a": 10, "b": -3, "c": 16, "d": "1_0", "e": "010"}
    # floats as YAML 1.2 writes them: -.5 was the string '-.5', 1_0.5 the float 10.5
    got = load_yaml("a: -.5\nb: +.5\nc: 1.\nd: 1e-4\ne: -2.5E+3\nf: 1_0.5\ng: 1_0e3\nh: -.inf\ni: .nan\nj: 1.5e")
    assert {k: v for k, v in got.items() if k != "i"} == {"a": -0.5, "b": 0.5, "c": 1.0, "d": 1e-4, "e": -2500.0,
                                                           "f": "1_0.5", "g": "1_0e3", "h": float("-inf"), "j": "1.5e"}
    assert got["i"] != got["i"]  # NaN
    (tmp_path / "cfgdir").mkdir()
    with pytest.raises(NsvitError, match="'.*cfgdir' is a folder: give a YAML file in it"):
        find_config(str(tmp_path / "cfgdir"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a ./digits image folder does not hide the packaged config
    assert find_config("digits").name == "digits.yaml"
    (tmp_path / "d.yaml").write_text("synth:\n  eps: 0.01\nrounds: 1\nsynth:\n  lim: 3.0\n")
    with pytest.raises(NsvitError, match="duplicate key 'synth' .line 4."):
        load_run(str(tmp_path / "d.yaml"))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "h.yaml").write_text("out: ~/runs/a\ndata: ~/train\nval_data: null\n")
    run, _ = load_run(str(tmp_path / "h.yaml"))
    assert run["out"] == str(tmp_path / "runs" / "a") and run["data"] == str(tmp_path / "train")
    assert run["val_data"] is None


def test_the_starting_models_val_accuracy_is_measured_before_round_0():
    """Fig. 4 divides by the initial value: round 0's record holds the untouched model's val
    accuracy, not the first round's (a large lr wrecks the model within the round)."""
    from nsvit_fast.eval.accuracy import accuracy

    val = digits("val")
    want = accuracy(load_model("digits_vit"), val.images, val.labels)
    res = finetune(load_model("digits_vit"), digits("train").subset(64), method="plain", rounds=2, model_steps=3,
                   lr=0.05, batch_size=32, val_data=val, progress=False)
    h = res.history
    assert want > 0.9 and h[0]["val_acc_start"] == pytest.approx(want) and h[0]["val_acc"] < want - 0.2
    assert "val_acc_start" not in h[1]  # once, before round 0


def test_validating_on_the_training_data_warns():
    train = digits("train").subset(32)
    kw = dict(method="plain", rounds=1, model_steps=1, batch_size=16, progress=False)
    with pytest.warns(UserWarning, match="the validation data is the training data"):
        finetune(load_model("digits_vit"), train, val_data=train, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the validation data")  # a held-out split: no word
        finetune(load_model("digits_vit"), train, val_data=digits("val").subset(32), **kw)


def test_val_images_are_spread_over_the_set():
    """val_images scored the first N images, which in a folder's class order is one or two classes:
    here the first 40 (classes 0-1) are labelled right and the rest shifted, so the first 40 score
    about 1 and a spread over the set about 0.2."""
    from nsvit_fast.data import ImageDataset

    val = digits("val")
    order = torch.argsort(val.labels, stable=True)
    x, y = val.images[order], val.labels[order]
    y = torch.where(y <= 1, y, (y + 1) % 10)
    res = finetune(load_model("digits_vit"), digits("train").subset(32), val_data=ImageDataset(x, y), rounds=1,
                   model_steps=1, lr=1e-9, batch_size=16, method="plain", val_images=40, progress=False)
    assert res.history[0]["val_acc"] < 0.5


@pytest.mark.slow  # two process start-ups under torchrun per case, refused before any training: ~15 s of CPU
@pytest.mark.parametrize("rank1", ["method", "weights", "mean_std"])
def test_torchrun_ranks_with_different_settings_are_refused(tmp_path, rank1):
    # rank 1 started with another seed (or method) trained its own way, or hung on a collective
    # rank 0 never made (ns against plain): every rank now compares its settings first. Other weights
    # or another mean / std on rank 1 ran as rank 0's (DDP's broadcast made them win, without a word)
    from nsvit_fast.models import save_model

    other = tmp_path / "other.safetensors"
    if rank1 == "weights":
        parts = load_model("digits_vit")
        with torch.no_grad():
            parts.model.head.bias.add_(0.01)
        save_model(parts, other)
    extra = {"method": "['method=plain']", "weights": f"['--checkpoint', {str(other)!r}]",
             "mean_std": "['--mean', '0.4', '0.4', '0.4', '--std', '0.3', '0.3', '0.3']"}[rank1]
    script = tmp_path / "rank_args.py"
    script.write_text("import os, sys\nfrom nsvit_fast.cli import main\n"
                      f"sys.exit(main(['finetune', '--quiet', '--out', {str(tmp_path / 'run')!r}, 'rounds=1', "
                      "'model_steps=1', 'batch_size=16', 'max_images=32', 'val_data=null', 'synth.max_steps=1', "
                      f"'synth.batch_size=16'] + ({extra} if os.environ['RANK'] == '1' else [])))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([*TORCHRUN2, str(script)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0
    assert "the ranks were started with different settings, model or data: rank(s) [1] differ" in run.stderr
    assert "]: Traceback" not in run.stderr, run.stderr[-3000:]  # a rank's own (torchrun's follows, as documented)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_resume_on_other_data_of_the_same_size_is_refused(tmp_path):
    # the stream's permutation only pins the size: labels rotated by 3 (or another val set) resumed
    # silently, mixing two datasets in one run; the checkpoint now names its data
    from nsvit_fast import ImageDataset

    d = digits("train").subset(64)
    kw = dict(method="plain", rounds=2, model_steps=2, batch_size=16, val_images=0, progress=False,
              out_dir=tmp_path / "run")
    finetune(load_model("digits_vit"), d, val_data=digits("val").subset(16), **kw)
    other = ImageDataset(d.images, (d.labels + 3) % 10)
    with pytest.raises(NsvitError, match="belongs to a run on other train data .*64 images in memory"):
        finetune(load_model("digits_vit"), other, val_data=digits("val").subset(16), resume=True, **kw)
    with pytest.raises(NsvitError, match="other val data"):
        finetune(load_model("digits_vit"), d, val_data=digits("test").subset(16), resume=True, **kw)
    finetune(load_model("digits_vit"), d, val_data=digits("val").subset(16), resume=True, **kw)  # the same: fine


def test_finetune_refuses_an_evaluation_folder(tmp_path):
    (tmp_path / "report.json").write_text("{}")  # eval refuses a run's folder; the reverse was accepted
    with pytest.raises(NsvitError, match="holds an evaluation report"):
        finetune(load_model("digits_vit"), digits("train").subset(32), rounds=1, model_steps=1, out_dir=tmp_path,
                 progress=False)


@pytest.mark.parametrize("t_max", [0, 40])
def test_lr_t_max_sets_the_models_cosine(train, t_max, monkeypatch):
    # the lr each AdamW step uses: cosine over rounds x model_steps (0) or over lr_t_max steps
    import math

    from helpers import spy_adamw

    seen = spy_adamw(monkeypatch, "lr")
    finetune(load_model("digits_vit"), train, method="plain", rounds=2, model_steps=4, lr=1e-3, batch_size=16,
             lr_t_max=t_max, progress=False)
    total = t_max or 8
    assert seen == pytest.approx([1e-3 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(8)], rel=1e-9)


def test_lr_t_max_below_the_run_is_refused(train):
    with pytest.raises(NsvitError, match="lr_t_max must be 0 .* at least the run's 8 steps, got 5"):
        finetune(load_model("digits_vit"), train, method="plain", rounds=2, model_steps=4, lr_t_max=5, progress=False)


def test_random_match_eps_scales_the_gaussian_to_just_inside_eps(train):
    # the ε-matched control: the round's seeded Gaussian, scaled so its MSE-prob on the round's
    # synthesis sample lies in [0.9 eps, eps), measured here again by noise_effect
    from nsvit_fast.synth import CleanCache, noise_effect
    from nsvit_fast.synth.engine import split_heldout
    from nsvit_fast.train.engine import Engine
    from nsvit_fast.runtime import Runtime

    parts = load_model("digits_vit")
    cfg = make_config(None, {"method": "random", "rounds": 1, "model_steps": 1,  # random.match eps: the default
                             "batch_size": 16, "synth.heldout": 96})
    eng = Engine(parts, train, cfg, None, None, False, Runtime.create("cpu", "fp32"))
    parts.eval()
    v = eng.method.prepare(eng.context(0))
    r = torch.randn(parts.token_shape, generator=torch.Generator().manual_seed(eng.round_seed(0)))
    s = float(v.norm() / r.norm())
    assert torch.allclose(v, r * s, rtol=1e-5, atol=1e-6)            # the seeded direction, scaled
    held = CleanCache(parts, split_heldout(train.images, 96, eng.round_seed(0))[1])
    mse = float(noise_effect(parts, v[None], held)[0][0])
    assert 0.9 * 0.03 <= mse < 0.03
    assert float(noise_effect(parts, 2 * v[None], held)[0][0]) >= 0.03  # not far inside: twice is outside
    # no NS noise is learned: under torchrun it may run with synth.mode reference (refused for ns)
    assert not eng.method.learns_noise() and METHODS["ns"]().learns_noise()
    assert METHODS["random"](make_config(None, {"random.match": "norm"}).random).learns_noise()
    with pytest.raises(NsvitError, match="set a norm-matched control: add random.match=norm"):
        make_config(None, {"method": "random", "random.norm": 3.0})
    with pytest.raises(NsvitError, match="random.match must be one of eps, norm"):
        make_config(None, {"method": "random", "random.match": "l2"})


def test_scale_to_eps_edge_cases():
    from nsvit_fast.synth import CleanCache, scale_to_eps

    parts = load_model("digits_vit")
    clean = CleanCache(parts, digits("val").images[:64])
    with pytest.raises(NsvitError, match="all-zero noise"):
        scale_to_eps(parts, torch.zeros(parts.token_shape), clean, 0.03)
    with pytest.raises(NsvitError, match="noise must be"):
        scale_to_eps(parts, torch.ones(3, 4), clean, 0.03)
    v = torch.randn(parts.token_shape)
    for kw, msg in ((dict(low=0), "low must be in"), (dict(iters=0), "iters must be"),
                    (dict(max_scale=-1), "max_scale must be > 0")):
        with pytest.raises(NsvitError, match=msg):
            scale_to_eps(parts, v, clean, 0.03, **kw)
    # MSE-prob is at most 2: an eps past it is never reached; the largest scale comes back, with a word
    with pytest.warns(UserWarning, match=r"under 0.9 x eps 2.5 \(the largest scale allowed\)"):
        s, mse = scale_to_eps(parts, v, clean, 2.5, max_scale=1e3)
    assert s == 1e3 and mse < 2.5
    with pytest.warns(UserWarning, match="after 2 forward"):  # out of forwards before the band
        s, mse = scale_to_eps(parts, v, clean, 0.03, iters=2)
    assert s > 0 and mse < 0.9 * 0.03  # the largest scale seen inside eps, under the band


def test_a_checkpoint_from_before_a_setting_existed_resumes_as_it_ran(train, tmp_path):
    # a checkpoint written before lr_t_max and random.match existed lacks both keys: it ran with
    # lr_t_max 0 and norm-matched random noise (the default before random.match: eps), so it
    # resumes as that run and no other; another method's block does not matter to a run
    from nsvit_fast.io import save_tensors

    def old_checkpoint(method, out, **extra):
        kw = dict(method=method, rounds=1, model_steps=2, batch_size=16, progress=False, out_dir=out,
                  synth={"max_steps": 5, "lim": 3.0, "batch_size": 32, "heldout": 32}, **extra)
        finetune(load_model("digits_vit"), train, **kw)
        t, m = load_tensors(out / "checkpoint.safetensors")
        del m["config"]["lr_t_max"], m["config"]["random"]["match"]
        save_tensors(out / "checkpoint.safetensors", t, m)
        return kw

    kw = old_checkpoint("plain", tmp_path / "plain")
    with pytest.raises(NsvitError, match=r"config key 'lr_t_max': 0 there, 100 here"):
        finetune(load_model("digits_vit"), train, **kw, resume=True, lr_t_max=100)
    assert len(finetune(load_model("digits_vit"), train, **kw, resume=True).history) == 1  # random: eps now
    kw = old_checkpoint("random", tmp_path / "random", random={"match": "norm", "norm": 2.0})
    with pytest.raises(NsvitError, match=r"config key 'random.match': 'norm' there, 'eps' here"):
        finetune(load_model("digits_vit"), train, **{**kw, "random": {}}, resume=True)
    assert len(finetune(load_model("digits_vit"), train, **kw, resume=True).history) == 1


def test_a_method_with_a_config_but_no_field_is_one_error(monkeypatch):
    # a Method added to METHODS without its MethodConfigs field failed in an AttributeError traceback
    from dataclasses import dataclass

    from nsvit_fast.train import methods as methods_mod
    from nsvit_fast.train.methods.base import Method

    @dataclass
    class WConfig:
        w: float = 1.0

        def check(self):
            pass

    class Weighted(Method):
        name, Config = "weighted", WConfig

    monkeypatch.setitem(methods_mod.METHODS, "weighted", Weighted)
    with pytest.raises(NsvitError, match="method 'weighted' has a Config but MethodConfigs has no field 'weighted'"):
        finetune(load_model("digits_vit"), digits("train").subset(16), method="weighted", rounds=1, model_steps=1,
                 batch_size=8, progress=False)

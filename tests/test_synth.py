"""Noise synthesis: reference and fast take the same trajectory, many noises equal one at a time,
stop rules, the boundary schedule, NoiseBank round trips, and bad input."""

import json

import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model
from nsvit_fast.synth import CleanCache, NoiseBank, SynthConfig, noise_effect, synthesize, synthesize_regularized
from nsvit_fast.synth.adamw import MaskedAdamW, cosine_lr
from nsvit_fast.synth.engine import split_heldout


@pytest.fixture(scope="module")
def train():
    return digits("train")


@pytest.fixture(scope="module")
def parts():
    return load_model("digits_vit")


def test_reference_and_fast_take_the_same_trajectory(parts, train):
    # two noises (the reference loop runs them one after the other, fast mode together): real
    # descents of 20-25 steps from MSE-prob ~0.5 into eps, each stopping on its own step
    init = (torch.rand(2, 16, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 3
    kw = dict(batch_size=64, max_steps=200, progress=False, init=init)
    ref = synthesize(parts, train, mode="reference", **kw)
    fast = synthesize(parts, train, mode="fast", **kw)
    assert ref.converged.all() and fast.converged.all()
    assert ref.steps.max() > 20 and ref.steps.tolist() == fast.steps.tolist()
    assert len(set(ref.steps.tolist())) == 2
    assert (ref.noises - fast.noises).abs().max() <= 1e-5 * float(ref.noises.abs().max())
    assert (ref.batch_mse_prob < 0.03).all()
    assert fast.batch_mse_prob.tolist() == pytest.approx(ref.batch_mse_prob.tolist(), abs=1e-6)
    assert fast.mse_prob.tolist() == pytest.approx(ref.mse_prob.tolist(), abs=1e-5)


# --- the official loop, transcribed verbatim as an oracle ---------------------------------------
# NS-ViT (Liu-Hy/NS-ViT) utils.py: encoder_forward and encoder_level_epsilon_noise, with only what
# cannot run here changed: no .cuda()/DDP branches, the prints and tqdm dropped, ``delta_x`` drawn
# from a seeded generator (so the caller can pass the same init), and timm >= 0.9's
# ``forward_head`` where timm 0.4.12 applied ``pre_logits`` and ``head`` to the class token.
# ``loader`` yields normalised images as the official loaders do.

def official_encoder_forward(model, x):
    mdl = model
    cls_token = mdl.cls_token
    pos_embed = mdl.pos_embed
    pos_drop = mdl.pos_drop
    blocks = mdl.blocks
    norm = mdl.norm

    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = pos_drop(x + pos_embed)
    x = blocks(x)
    x = norm(x)
    return x  # official: mdl.pre_logits(x[:, 0]); forward_head below takes the class token


def official_encoder_level_epsilon_noise(model, loader, delta_x, rounds, nlr, eps, img_ratio):
    from torch.optim import AdamW
    from torch.optim.lr_scheduler import CosineAnnealingLR

    model.eval()
    model.zero_grad()
    mdl = model
    patch_embed = mdl.patch_embed
    delta_x = delta_x.clone()
    delta_x.requires_grad = True

    optimizer = AdamW([delta_x], lr=nlr)
    scheduler = CosineAnnealingLR(optimizer, len(loader) * rounds)
    n_steps = 0
    for i in range(rounds):
        for st, (imgs, lab) in enumerate(loader):
            assert delta_x.requires_grad == True  # noqa: E712
            if st > int(img_ratio * len(loader)) - 1:
                break

            with torch.no_grad():
                og_preds = mdl.forward_head(mdl.forward_features(imgs))

            optimizer.zero_grad()

            x = patch_embed(imgs)
            x = x + delta_x

            preds = mdl.forward_head(official_encoder_forward(model, x))

            p_og = torch.softmax(og_preds, dim=-1)
            p_alt = torch.softmax(preds, dim=-1)
            mse_probs = (((p_og - p_alt) ** 2).sum(dim=-1)).mean()
            if mse_probs < eps:
                return delta_x, n_steps, True
            error_mult = (((preds - og_preds) ** 2).sum(dim=-1) ** 0.5).mean()
            error_mult.backward()
            optimizer.step()
            scheduler.step()
            n_steps += 1
    return delta_x, n_steps, False


class _Loader:
    """A loader of ``n_batches`` batches per pass whose first ``used`` batches come from the same
    seeded BatchStream as synthesize, so the official loop sees synthesize's batches in its order.
    The official loop fetches batch ``used`` and breaks before using it: that one is a placeholder
    (a shuffling DataLoader draws a fresh permutation each pass, so it never matters there)."""

    def __init__(self, parts, images, batch_size, n_batches, used, seed):
        from nsvit_fast.synth.batches import BatchStream

        self.parts, self.images, self.n, self.used = parts, images, n_batches, used
        self.stream = BatchStream(images.shape[0], batch_size, seed)

    def __len__(self):
        return self.n

    def __iter__(self):
        for st in range(self.n):
            if st < self.used:
                yield self.parts.normalize(self.images[self.stream.next()]), None
            else:
                yield None, None


def test_reference_mode_is_the_official_loop(parts, train):
    # 3 rounds of a 40-batch loader at img_ratio 0.1: at most 12 steps and cosine T_max = 120, as
    # SynthConfig's official schedule for max_steps = 12; MSE-prob falls from 0.92 to pass eps at step 6
    images = train.images[:256]
    init = (torch.rand(16, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 3.0
    kw = dict(batch_size=32, max_steps=12, eps=0.06, seed=0, heldout=32, progress=False)
    ref = synthesize(parts, images, mode="reference", init=init, **kw)
    fast = synthesize(parts, images, mode="fast", init=init, **kw)
    model = parts.model
    v, steps, done = official_encoder_level_epsilon_noise(
        model, _Loader(parts, images, 32, 40, 4, seed=0), init[None], rounds=3, nlr=0.1, eps=0.06, img_ratio=0.1)
    v = v.detach()[0]
    assert all(p.grad is not None for p in model.parameters())  # the official loop computes weight grads
    model.zero_grad()
    assert done and 3 <= steps < 12
    assert (int(ref.steps[0]), bool(ref.converged[0])) == (steps, done)
    assert (int(fast.steps[0]), bool(fast.converged[0])) == (steps, done)
    assert (ref.noises[0] - v).abs().max() <= 1e-6 * float(v.abs().max())
    assert (fast.noises[0] - v).abs().max() <= 1e-5 * float(v.abs().max())
    # the old schedule (T_max = max_steps: the lr halves by step 6) leaves the official trajectory
    old = synthesize(parts, images, mode="fast", init=init, lr_schedule="max_steps", **kw)
    assert int(old.steps[0]) != steps or (old.noises[0] - v).abs().max() > 1e-3 * float(v.abs().max())


def test_official_schedule_keeps_the_lr_near_its_base():
    from nsvit_fast.synth.engine import lr_t_max

    cfg = SynthConfig()
    assert lr_t_max(cfg) == 30000 and cosine_lr(cfg.lr, 2999, lr_t_max(cfg)) > 0.097
    assert lr_t_max(SynthConfig(lr_t_max=30030)) == 30030
    assert lr_t_max(SynthConfig(lr_schedule="max_steps")) == 3000


def test_many_noises_equal_one_at_a_time(parts, train):
    init = torch.stack([(torch.rand(16, 96, generator=torch.Generator().manual_seed(s)) * 2 - 1) * lim
                        for s, lim in ((1, 3.0), (2, 3.0), (3, 2.5))])
    kw = dict(batch_size=32, max_steps=300, progress=False)
    many = synthesize(parts, train, init=init, max_rows=50, **kw)  # chunked: 1 noise x 32 rows per forward
    assert len(many) == 3 and len(set(many.steps.tolist())) > 1  # each stopped on its own
    for i in range(3):
        one = synthesize(parts, train, init=init[i], **kw)
        assert int(one.steps[0]) == int(many.steps[i])
        assert (one.noises[0] - many.noises[i]).abs().max() <= 1e-4


def test_fast_mode_does_no_extra_work(parts, train, monkeypatch):
    calls = {"patch_embed": 0, "encode_with_weight_grad": 0}
    orig, orig_encode = type(parts).patch_embed, type(parts).encode

    def counted(self, x):
        calls["patch_embed"] += x.shape[0]
        return orig(self, x)

    def encode(self, u):
        calls["encode_with_weight_grad"] += any(p.requires_grad for p in self.parameters())
        return orig_encode(self, u)

    monkeypatch.setattr(type(parts), "patch_embed", counted)
    monkeypatch.setattr(type(parts), "encode", encode)
    bank = synthesize(parts, train, lim=4.0, batch_size=64, max_steps=400, heldout=0, progress=False)
    steps = int(bank.steps[0]) + 1
    # each image's patch embedding is computed once (cache), not twice per step as the reference does
    assert calls["patch_embed"] <= len(train) + 64 and steps * 64 > len(train)
    assert calls["encode_with_weight_grad"] == 0  # input-only backward: weights frozen throughout
    assert all(p.requires_grad for p in parts.parameters())  # and the flags are restored


def test_sparse_checks_run_no_masked_out_steps(parts, train, monkeypatch):
    """check_every 16 (the CUDA default, tried here on the CPU): a warm start that passes at once runs
    the same noisy forwards as checking every step, not 15 more whose results are masked out; and
    a fresh descent ends in the same noise either way."""
    calls = {"n": 0}
    orig = type(parts).encode_noisy

    def counted(self, *a, **kw):
        calls["n"] += 1
        return orig(self, *a, **kw)

    kw = dict(lim=4.0, batch_size=64, max_steps=400, heldout=0, progress=False)
    every = {k: synthesize(parts, train, check_every=k, **kw) for k in (1, 16)}
    assert torch.equal(every[1].noises, every[16].noises) and torch.equal(every[1].steps, every[16].steps)
    monkeypatch.setattr(type(parts), "encode_noisy", counted)
    ran = {}
    for k in (1, 16):
        calls["n"] = 0
        bank = synthesize(parts, train, init=every[1].noises * 0.5, check_every=k, **kw)
        assert int(bank.steps[0]) == 0
        ran[k] = calls["n"]
    assert ran[16] == ran[1]


def test_weights_untouched_and_modes_restored(parts, train):
    before = {k: v.clone() for k, v in parts.state_dict().items()}
    parts.train()
    for mode in ("reference", "fast"):
        with pytest.warns(UserWarning, match="did not pass"):
            synthesize(parts, train, mode=mode, max_steps=3, batch_size=32, progress=False)
    assert parts.training
    parts.eval()
    assert all(p.grad is None for p in parts.parameters())  # reference's weight grads were dropped
    assert all(torch.equal(before[k], v) for k, v in parts.state_dict().items())


def test_stop_rules_and_heldout_record(parts, train):
    kw = dict(lim=4.0, batch_size=64, max_steps=600, progress=False, seed=1)
    batch = synthesize(parts, train, stop="batch", **kw)
    held = synthesize(parts, train, stop="heldout", **kw)
    assert bool(held.converged[0]) and held.mse_prob[0] < 0.03  # confirmed on held-out data
    assert held.steps[0] >= batch.steps[0]
    for b in (batch, held):  # held-out metrics recorded whichever rule ran
        assert b.meta["heldout_images"] == 256 and 0 < b.match_rate[0] <= 1


def test_heldout_images_are_not_trained_on():
    """stop=heldout, the boundary schedule, Eq. 4 and Fig. 5 promise measurements on images the
    noise never descended on: the two sides of the carve are disjoint and together the whole set."""
    tr, he = split_heldout(torch.arange(1200)[:, None], 256, 0)
    a, b = set(tr[:, 0].tolist()), set(he[:, 0].tolist())
    assert len(b) == 256 and not a & b and a | b == set(range(1200))
    assert split_heldout(torch.arange(1200)[:, None], 256, 1)[1].flatten().tolist() != he.flatten().tolist()


def test_reference_and_fast_take_the_same_trajectory_under_the_heldout_stop(parts, train):
    """A batch pass that the held-out set refuses blocks the next confirmation for heldout_every
    steps, in both loops: a loop that re-confirmed sooner (or never waited) stops elsewhere."""
    kw = dict(lim=4.0, batch_size=8, max_steps=400, seed=1, stop="heldout", heldout=64, progress=False)
    ref = synthesize(parts, train, mode="reference", **kw)
    fast = synthesize(parts, train, mode="fast", **kw)
    assert ref.meta["train_images"] == len(train) - 64 and ref.meta["heldout_images"] == 64
    assert ref.converged.all() and ref.steps.tolist() == fast.steps.tolist()
    assert (ref.noises - fast.noises).abs().max() <= 1e-4 * float(ref.noises.abs().max())
    b = synthesize(parts, train, **{**kw, "stop": "batch"})
    assert int(b.steps[0]) < int(ref.steps[0])  # the held-out set refused at least one batch pass


def test_not_converged_is_flagged_with_a_warning(parts, train):
    with pytest.warns(UserWarning, match="did not pass the stop rule"):
        bank = synthesize(parts, train, lim=10.0, max_steps=5, batch_size=32, progress=False)
    assert not bool(bank.converged[0]) and int(bank.steps[0]) == 5


def test_boundary_schedule_sits_inside_eps(parts, train):
    bank = synthesize(parts, train, lim=3.0, schedule="boundary", batch_size=64, max_steps=600, progress=False)
    paper = synthesize(parts, train, lim=3.0, batch_size=64, max_steps=600, progress=False)
    assert bank.mse_prob[0] < 0.03            # inside ε on held-out data
    assert bank.norm[0] >= paper.norm[0]      # and at least the paper's norm
    cache = CleanCache(parts, split_heldout(train.images, 256, 0)[1])
    # just inside: 10% more norm leaves ε (the boundary was found, not a point deep inside)
    assert noise_effect(parts, bank.noises * 1.1, cache)[0][0] >= 0.03 * 0.9


def test_init_scale_boundary_grows_a_warm_start_to_the_edge_of_eps(parts, train):
    held = train.subset(128)
    v = synthesize(parts, train, lim=3.0, batch_size=64, max_steps=600, progress=False).noises[0]
    small = v * 0.5                        # well inside ε: its good interval reaches past 1
    bank = synthesize(parts, train, init=small, init_scale="boundary", heldout_data=held, batch_size=64,
                      max_steps=600, progress=False)
    s = bank.meta["init_scale_factor"][0]
    cache = CleanCache(parts, held.images)
    mse_at = lambda a: noise_effect(parts, (small * a)[None], cache)[0][0].item()
    assert bank.meta["init_mse_prob"][0] == pytest.approx(mse_at(1.0), rel=1e-4)
    assert s > 1.25                                 # grown
    assert 0.8 * 0.03 <= mse_at(s) < 0.03           # to just inside ε on the held-out images
    assert mse_at(s * 1.15) >= 0.03                 # near its edge: 15% more leaves ε
    # the call's time split by phase: the search is charged to grow, and the phases add up to the call
    ph = bank.meta["phase_seconds"]
    assert list(ph) == ["setup", "grow", "descent", "to_boundary", "metrics"] and min(ph.values()) >= 0
    assert ph["grow"] > 0 and sum(ph.values()) <= bank.meta["seconds"] + 1e-3 <= sum(ph.values()) + 0.5  # rounding
    with pytest.raises(NsvitError, match="init_scale"):
        synthesize(parts, train, init=small, init_scale="grow", max_steps=5, progress=False)


def test_grow_walk_and_floor_start_at_the_floor_in_fewer_forwards(parts, train, monkeypatch):
    """warm_boundary's growth searches: walk never tries below init_min_scale and ends inside ε in
    no more held-out forwards than the secant search; floor takes the floor with one forward (the drift)."""
    from nsvit_fast.synth import engine

    held = train.subset(128)
    small = synthesize(parts, train, lim=3.0, batch_size=64, max_steps=600, progress=False).noises[0] * 0.5
    cache = CleanCache(parts, held.images)
    mse_at = lambda a: noise_effect(parts, (small * a)[None], cache)[0][0].item()
    calls = []
    real = engine.noise_effect

    def counted(parts_, v, clean, max_rows=2048, scales=None):
        if clean.images.shape[0] == held.images.shape[0]:  # held-out forwards only, not the descent's
            calls.append(1.0 if scales is None else float(scales[0]))
        return real(parts_, v, clean, max_rows, scales=scales)

    monkeypatch.setattr(engine, "noise_effect", counted)
    used, out = {}, {}
    for search in ("secant", "walk", "floor"):
        calls.clear()
        bank = synthesize(parts, train, init=small, init_scale="boundary", init_min_scale=1.25, heldout_data=held,
                          batch_size=64, max_steps=600, progress=False, grow_search=search)
        used[search], out[search] = calls[:-1], bank.meta["init_scale_factor"][0]  # the last is the metrics forward
    monkeypatch.undo()
    assert used["walk"][0] == 1.0 and min(used["walk"][1:]) >= 1.25  # the drift, then never below the floor
    assert len(used["walk"]) <= len(used["secant"])  # (the finetuned case, where secant overshoots: bench/noise_cost.py)
    s = out["walk"]
    assert s >= 1.25 and mse_at(s) < 0.03             # grown, inside ε
    assert mse_at(s) >= 0.8 * 0.03 or mse_at(s * 1.25) >= 0.03  # near its edge: x1.25 more leaves ε
    assert used["floor"] == [1.0] and out["floor"] == pytest.approx(1.25)
    with pytest.raises(NsvitError, match="grow_search"):
        synthesize(parts, train, init=small, init_scale="boundary", grow_search="bisect", max_steps=5, progress=False)


def test_a_noise_at_its_cap_that_passes_at_once_costs_one_heldout_forward(parts, train, monkeypatch):
    """A warm start already at its norm cap (the cap's ratio is 1 to float32 precision) is used as
    it is; when the descent passes at step 0 the bank's metrics reuse the drift's forward."""
    from nsvit_fast.synth import engine

    held = train.subset(128)
    v = synthesize(parts, train, lim=3.0, batch_size=64, max_steps=600, progress=False).noises[0] * 0.5
    calls = []
    real = engine.noise_effect

    def counted(parts_, noises, clean, max_rows=2048, scales=None):
        if clean.images.shape[0] == held.images.shape[0]:
            calls.append(noises.detach().clone())
        return real(parts_, noises, clean, max_rows, scales=scales)

    monkeypatch.setattr(engine, "noise_effect", counted)
    kw = dict(init_scale="boundary", init_min_scale=1.25, heldout_data=held, batch_size=64, max_steps=600,
              progress=False)
    bank = synthesize(parts, train, init=v, init_max_scale=1 + 1e-7, **kw)
    assert int(bank.steps[0]) == 0 and torch.equal(bank.noises[0], v)  # at the cap: not rescaled, not moved
    assert len(calls) == 1 and bank.meta["init_scale_factor"] == [1.0]   # the drift's forward only
    monkeypatch.undo()
    mse, match = noise_effect(parts, bank.noises, CleanCache(parts, held.images))
    assert bank.mse_prob[0] == mse[0] and bank.match_rate[0] == match[0]
    assert bank.meta["init_mse_prob"][0] == pytest.approx(float(mse[0]))
    # a cap below 1 scales it down, and the metrics are measured again on the scaled noise
    monkeypatch.setattr(engine, "noise_effect", counted)
    calls.clear()
    bank = synthesize(parts, train, init=v, init_max_scale=0.9, **kw)
    assert len(calls) == 2 and torch.allclose(bank.noises[0], v * 0.9)
    monkeypatch.undo()
    assert bank.mse_prob[0] == noise_effect(parts, bank.noises, CleanCache(parts, held.images))[0][0]


def test_regularized_eq4_and_permutation_control(parts, train):
    bank = synthesize_regularized(parts, train, lam=[0.0, 1.0, 4.0], steps=60, batch_size=64, lim=3.0,
                                  progress=False)
    assert bank.meta["lam"] == [0.0, 1.0, 4.0]
    n = bank.norm.tolist()
    assert n[0] < n[1] < n[2]  # a stronger log-norm reward keeps larger noise
    # the learned noise is far more benign than its shuffled copy (the paper's Fig. 3a)
    assert all(m < p for m, p in zip(bank.mse_prob.tolist(), bank.meta["permuted_mse_prob"]))
    assert bank.match_rate[2] > bank.meta["permuted_match_rate"][2]


def test_bank_round_trip_and_model_check(tmp_path, parts, train):
    bank = synthesize(parts, train, num_noises=2, max_steps=50, batch_size=64, progress=False)
    p = bank.save(tmp_path / "bank.safetensors")
    again = NoiseBank.load(p, parts=parts)
    assert torch.equal(again.noises, bank.noises) and again.steps.tolist() == bank.steps.tolist()
    assert again.converged.dtype == torch.bool and again.meta["eps"] == 0.03
    other = load_model("digits_vit")
    with torch.no_grad():
        other.model.head.weight.add_(0.01)
    with pytest.warns(UserWarning, match="learned on other weights"):
        NoiseBank.load(p, parts=other)
    with pytest.raises(NsvitError, match="do not fit"):
        NoiseBank.load(p, parts=load_model("vit_tiny_patch16_224", depth=1))
    (tmp_path / "cut.safetensors").write_bytes(p.read_bytes()[:100])
    with pytest.raises(NsvitError, match="truncated"):
        NoiseBank.load(tmp_path / "cut.safetensors")


def test_jsonl_log_has_every_check(tmp_path, parts, train):
    bank = synthesize(parts, train, lim=4.0, batch_size=64, max_steps=400, progress=False, log=tmp_path / "s.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(recs) == int(bank.steps[0]) + 1  # CPU: one check per step, the last one fires
    assert recs[-1]["mse_prob"][0] < 0.03 <= recs[0]["mse_prob"][0]


def test_the_log_pairs_each_mse_with_the_norm_it_tested_and_names_the_noises(tmp_path, parts, train):
    # the fast mode logged the norm after the step's update beside the step's MSE (the reference
    # mode's next norm); records named no noise, and reference mode's second noise restarted at step 0
    kw = dict(lim=4.0, batch_size=32, max_steps=3, eps=1e-9, num_noises=2, progress=False)
    recs = {}
    for mode in ("fast", "reference"):
        synthesize(parts, train.subset(64), mode=mode, log=tmp_path / f"{mode}.jsonl", **kw)
        recs[mode] = [json.loads(line) for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
    fast, ref = recs["fast"], recs["reference"]
    assert [r["noise"] for r in fast] == [[0, 1]] * 3
    assert [(r["step"], r["noise"]) for r in ref] == [(t, [i]) for i in (0, 1) for t in range(3)]
    for r in fast:  # noise i's step t as the reference mode tested it
        for i in (0, 1):
            same = next(x for x in ref if x["step"] == r["step"] and x["noise"] == [i])
            assert r["norm"][i] == pytest.approx(same["norm"][0], rel=1e-5)
            assert r["mse_prob"][i] == pytest.approx(same["mse_prob"][0], rel=1e-4)
    assert fast[0]["norm"] != fast[1]["norm"]  # the noise moved between the records


def test_masked_adamw_equals_torch_adamw_with_cosine():
    torch.manual_seed(0)
    target = torch.randn(2, 5, 7)
    v0 = torch.randn(2, 5, 7)
    ref = v0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    mine, madam = v0.clone(), MaskedAdamW(v0.shape, "cpu", lr=0.1, weight_decay=0.01)
    for t in range(50):
        opt.zero_grad()
        ((ref - target) ** 2).sum().backward()
        opt.step()
        sched.step()
        g = 2 * (mine - target)
        madam.step(mine, g, torch.arange(2), torch.ones(2, dtype=torch.bool), t + 1, cosine_lr(0.1, t, 50))
    assert (mine - ref.detach()).abs().max() < 1e-5
    # a masked row does not move
    frozen = mine.clone()
    madam.step(mine, torch.ones_like(mine), torch.arange(2), torch.tensor([True, False]), 51, 0.1)
    assert torch.equal(mine[1], frozen[1]) and not torch.equal(mine[0], frozen[0])


def test_clean_cache_drops_stale_entries(parts, train):
    cache = CleanCache(parts, train.images[:40])
    u1, z1, _ = cache.get(torch.arange(8))
    with torch.no_grad():
        parts.model.head.bias.add_(1.0)
    try:
        _, z2, _ = cache.get(torch.arange(8))
        assert torch.allclose(z2, z1 + 1.0, atol=1e-5)  # recomputed after the weights changed
    finally:
        with torch.no_grad():
            parts.model.head.bias.sub_(1.0)


def test_a_given_cache_sees_writes_no_version_counter_sees(parts, train):
    # p.data.copy_ (an EMA copied in) and p.data = ... bump no counter: a kept cache served the old
    # weights' clean logits, so the descent aimed at them and the bank's MSE-prob was the old model's
    imgs = train.images[:256]
    kw = dict(batch_size=64, max_steps=60, eps=0.03, lim=3.0, progress=False)
    saved = {k: v.clone() for k, v in parts.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    try:
        for how in ("copy_", "assign"):
            parts.model.load_state_dict(saved)
            cache = CleanCache(parts, imgs)
            cache.all()  # filled under the old weights
            for p in parts.parameters():
                if how == "copy_":
                    p.data.copy_(p.data + 0.02 * torch.randn(p.shape, generator=g))
                else:
                    p.data = p.data + 0.02 * torch.randn(p.shape, generator=g)
            kept = synthesize(parts, imgs, cache=cache, **kw)
            fresh = synthesize(parts, imgs, cache=CleanCache(parts, imgs), **kw)
            assert torch.equal(kept.noises, fresh.noises) and kept.mse_prob.tolist() == fresh.mse_prob.tolist(), how
            assert kept.meta["model_fingerprint"] == fresh.meta["model_fingerprint"]
    finally:
        parts.model.load_state_dict(saved)
    # pixels written in place: the entries of the old pixels go too
    x = train.images[:16].clone()
    cache = CleanCache(parts, x)
    cache.all()
    x.mul_(0.5)
    assert torch.equal(cache.all()[1], CleanCache(parts, x).all()[1])


def test_precision_is_the_calls_for_a_given_cache_and_in_reference_mode(parts, train):
    from nsvit_fast.runtime import Runtime

    imgs = train.images[:256]
    kw = dict(batch_size=64, max_steps=40, eps=0.03, lim=3.0, progress=False)
    # a cache's forwards set the run's precision: one of another precision is refused, not obeyed
    with pytest.raises(NsvitError, match="cache= computes in fp32, this call in precision bf16"):
        synthesize(parts, imgs, cache=CleanCache(parts, imgs), precision="bf16", **kw)
    bf16 = CleanCache(parts, imgs, autocast=Runtime.create("cpu", "bf16").autocast)
    with pytest.raises(NsvitError, match="cache= computes in bf16, this call in precision fp32"):
        synthesize(parts, imgs, cache=bf16, precision="fp32", **kw)
    # the reference loop ran fp32 under precision=bf16 (0.18 from the fast bf16 noise; fp32 agrees to 1e-5)
    fast = synthesize(parts, imgs, cache=bf16, precision="bf16", **kw)
    ref = synthesize(parts, imgs, mode="reference", precision="bf16", **kw)
    assert ref.steps.tolist() == fast.steps.tolist()
    assert float((ref.noises - fast.noises).abs().max()) < 0.03 * float(fast.noises.abs().max())


def test_summary_counts_the_noises_it_holds(parts, train):
    init = torch.zeros(3, *parts.token_shape).uniform_(-0.1, 0.1)
    bank = synthesize(parts, train.images[:64], init=init, batch_size=32, max_steps=2, progress=False)
    assert bank.meta["num_noises"] == 3 and bank.summary()["num_noises"] == 3  # was the config's 1
    assert bank[:2].summary()["num_noises"] == 2
    # an index past the bank names its size, and stays an IndexError so a for loop ends
    with pytest.raises(IndexError, match="noise 3 out of range: the bank has 3 noise"):
        bank[3]
    assert len(bank[-3]) == 1 and len(list(bank)) == 3


def test_ranks_refuse_a_batch_they_cannot_share_evenly(parts, train):
    # each rank averages its slice and the means are averaged: only the batch mean for equal slices
    from nsvit_fast.data.base import ImageDataset
    from nsvit_fast.data.batches import TensorBatches
    from nsvit_fast.synth.sources import CachedSource

    small = ImageDataset(train.images[:5], train.labels[:5], train.classes)
    with pytest.raises(NsvitError, match="holds 5 images, fewer than its batch size 16, so a step's batch is all 5, "
                                         "which does not divide by the 2 processes"):
        TensorBatches(small, 16, rank=0, world=2)
    with pytest.raises(NsvitError, match="batch size is 9, which does not divide by the 2 processes"):
        CachedSource(CleanCache(parts, train.images[:40]), 9, 0, rank=1, world=2)
    assert TensorBatches(small, 16).next()[0].shape[0] == 5  # one process: all 5
    assert CachedSource(CleanCache(parts, train.images[:40]), 8, 0, rank=1, world=2).next()[0].shape[0] == 4


@pytest.mark.parametrize("kw,msg", [
    (dict(eps=0), "eps must be"), (dict(eps=-1), "eps must be"), (dict(lim=0), "lim must be"),
    (dict(mode="turbo"), "mode must be"), (dict(schedule="x"), "schedule must be"), (dict(stop="x"), "stop must be"),
    (dict(epss=0.1), "did you mean 'eps'"), (dict(init=torch.zeros(3, 5)), "init must be"),
    (dict(max_steps=0), "max_steps must be"),
])
def test_bad_input(parts, train, kw, msg):
    with pytest.raises(NsvitError, match=msg):
        synthesize(parts, train, progress=False, **kw)


def test_bad_data(parts):
    with pytest.raises(NsvitError, match="empty"):
        synthesize(parts, torch.zeros(0, 3, 32, 32), progress=False)
    x = torch.rand(4, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NsvitError, match="NaN"):
        synthesize(parts, x, progress=False)
    with pytest.raises(NsvitError, match="takes images"):
        synthesize(parts, torch.rand(4, 3, 64, 64), progress=False)


def _strict_json(line: str):
    def refuse(tok):
        raise AssertionError(f"{tok} token in JSON: other readers reject it")
    return json.loads(line, parse_constant=refuse)


def test_the_log_and_json_stdout_hold_no_nan_tokens(tmp_path):
    # a diverging check's NaN / inf is null in the synth log, as in every file write_json writes
    from nsvit_fast.io import dumps
    from nsvit_fast.synth.engine import _Log

    assert _strict_json(dumps({"a": float("nan"), "b": [float("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}
    log = _Log(tmp_path / "s.jsonl", total=2, progress=False, desc="t")
    log.check(0, torch.tensor([float("nan"), 0.1]), torch.tensor([1.0, float("inf")]), active=2)
    log.close(ok=True)
    rec = _strict_json((tmp_path / "s.jsonl").read_text())
    assert rec["mse_prob"] == [None, 0.1] and rec["norm"] == [1.0, None]


@pytest.mark.parametrize("kw", ["eps", "max_steps", "stop", "heldout", "schedule"])
def test_profile_refuses_settings_it_would_ignore(parts, kw):
    from nsvit_fast.synth import profile_synth

    with pytest.raises(NsvitError, match=f"takes no '{kw}'"):
        profile_synth(parts, torch.rand(4, 3, 32, 32), steps=1, trace=None, **{kw: 1})


def test_profile_runs_every_step_even_for_a_noise_that_moves_nothing(parts, train):
    # eps was forced to 1e-12, so a noise of MSE-prob 0 (lim 1e-6) stopped at its first step, and the
    # report still gave 20 steps and a per-step time 13x too small
    from nsvit_fast.synth import profile_synth

    out = profile_synth(parts, train.images[:32], steps=5, trace=None, lim=1e-6, batch_size=16)
    assert out["steps"] == 5
    assert {p: out["phases"][p]["calls"] for p in ("noisy_forward", "backward", "optimizer")} == {
        "noisy_forward": 5, "backward": 5, "optimizer": 5}

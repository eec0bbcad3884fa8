"""Patch-Fool as its authors wrote it: each piece against hand-computed values, the whole attack
against a transcription of the authors' loop (RICE-EIC/Patch-Fool main.py) on a tiny ViT, and
the attack's effect on the embedded digits model."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from nsvit_fast import NsvitError, digits, load_model
from nsvit_fast.eval import evaluate
from nsvit_fast.eval.patchfool import (PatchFool, attention_loss, attention_patches, patch_mask, patchfool_lite,
                                       pcgrad, saliency_patches)
from nsvit_fast.eval.suite import parse_suite
from nsvit_fast.models.registry import adapt


@pytest.fixture(scope="module")
def tiny():
    """A 6-block ViT on 16 px images, 4 px patches (16 patches), seeded random weights."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=24,
                          depth=6, num_heads=2, num_classes=5).eval()
    return adapt(m, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def test_attention_loss_hand_computed():
    h1 = [[.5, .25, .25], [.2, .6, .2], [.1, .1, .8]]
    h2 = [[.3, .45, .25], [.4, .4, .2], [.3, .3, .4]]
    attn = torch.tensor([[h1, h2]])  # (B=1, heads=2, T=3, T=3); head mean [[.4 .35 .25] [.3 .5 .2] [.2 .2 .6]]
    want = (math.log(0.35) + math.log(0.5) + math.log(0.2)) / 3  # mean over queries of log a[q, p=1]
    assert float(attention_loss(attn, torch.tensor([1]))) == pytest.approx(want, rel=1e-6)
    two = torch.cat([attn, attn.flip(-1)])  # second image: token 1 is still column 1 after the flip
    want2 = (math.log(0.35) + math.log(0.5) + math.log(0.2)) / 3
    assert float(attention_loss(two, torch.tensor([1, 1]))) == pytest.approx((want + want2) / 2, rel=1e-6)


def test_pcgrad_hand_computed():
    att = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    ce = torch.tensor([[-1.0, 1.0], [1.0, 0.0]])
    out = pcgrad(att, ce)
    # row 0 conflicts (cos = -1/sqrt 2): g - (g.c / ||c||) c = [1, 0] + (1/sqrt 2) [-1, 1], the authors'
    # single division by ||c|| (a unit-normalised projection would give [0.5, 0.5])
    r = 1 / math.sqrt(2)
    assert torch.allclose(out[0], torch.tensor([1 - r, r]))
    assert torch.equal(out[1], att[1])  # no conflict: unchanged
    assert pcgrad(att.reshape(2, 1, 2, 1), ce.reshape(2, 1, 2, 1)).shape == (2, 1, 2, 1)


def test_patch_choices_hand_computed():
    maps = [torch.rand(2, 2, 5, 5) for _ in range(6)]
    a = torch.full((2, 2, 5, 5), 0.1)
    a[0, :, :, 3] = 0.4   # image 0: token 3 = patch 2 receives most (prefix token 0 dropped)
    a[1, 0, :, 0] = 0.9   # image 1: the class token gets most, but it is not a patch
    a[1, 1, :, 1] = 0.3   # patch 0 next
    a[1, 0, :, 4] = 0.25  # patch 3: mean over heads (0.25 + 0.1) / 2 < (0.1 + 0.3) / 2
    maps[4] = a
    assert attention_patches(maps, 4, 1, 1).tolist() == [[2], [0]]
    assert attention_patches(maps, 4, 1, 2).tolist()[1] == [0, 3]
    g = torch.zeros(1, 3, 8, 8)
    g[0, 1, 4:8, 0:4] = -2.0   # patch 2 of a 2x2 grid of 4 px patches: |grad| sum 32
    g[0, 0, 0, 7] = 5.0        # patch 1: 5
    assert saliency_patches(g, (4, 4), 2).tolist() == [[2, 1]]


def test_attention_patch_choice_on_a_tiny_vit(tiny):
    # block 4's attention by hand: run blocks 0..3, then softmax(q k^T * scale) of block 4
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m = tiny.model
    with torch.no_grad():
        t = m.norm_pre(m._pos_embed(m.patch_embed(tiny.normalize(x))))
        for blk in m.blocks[:4]:
            t = blk(t)
        blk = m.blocks[4]
        qkv = blk.attn.qkv(blk.norm1(t)).reshape(3, 17, 3, 2, 12).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-2, -1) * 12 ** -0.5).softmax(-1)  # (B, heads, T, T)
        want = a.mean(1).mean(1)[:, 1:].argmax(1)
    atk = PatchFool(tiny)
    got = atk.choose_patches(tiny.normalize(x), torch.zeros(3, dtype=torch.long))
    assert got[:, 0].tolist() == want.tolist()


# --- the authors' loop, transcribed (main.py, vanilla Patch-Fool: sparse_pixel_num 0, no mild
# constraint) with only what cannot run here changed: no .cuda(), the model returns (out, atten)
# through the adapter, the random start ``start`` is given, and 197 becomes T = P + N --------------

def authors_patch_fool(model, X, y, start, mu, std, args, patch_size, T):
    criterion = torch.nn.CrossEntropyLoss()
    patch_num_per_line = int(X.size(-1) / patch_size)
    delta = torch.zeros_like(X)
    delta.requires_grad = True
    model.zero_grad()
    out, atten = model(X + delta)
    loss = criterion(out, y)
    atten_layer = atten[args["atten_select"]].mean(dim=1)
    atten_layer = atten_layer.mean(dim=-2)[:, 1:]
    max_patch_index = atten_layer.argsort(descending=True)[:, :args["num_patch"]]
    mask = torch.zeros([X.size(0), 1, X.size(2), X.size(3)])
    for j in range(X.size(0)):
        index_list = max_patch_index[j]
        for index in index_list:
            row = (index // patch_num_per_line) * patch_size
            column = (index % patch_num_per_line) * patch_size
            mask[j, :, row:row + patch_size, column:column + patch_size] = 1
    max_patch_index_matrix = max_patch_index[:, 0]
    max_patch_index_matrix = max_patch_index_matrix.repeat(T, 1)
    max_patch_index_matrix = max_patch_index_matrix.permute(1, 0)
    max_patch_index_matrix = max_patch_index_matrix.flatten().long()
    delta = (start - mu) / std
    delta.data = torch.max(torch.min(delta, (1 - mu) / std), (0 - mu) / std)
    X = torch.mul(X, 1 - mask)
    delta.requires_grad = True
    opt = torch.optim.Adam([delta], lr=args["attack_learning_rate"])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=args["step_size"], gamma=args["gamma"])
    for train_iter_num in range(args["train_attack_iters"]):
        model.zero_grad()
        opt.zero_grad()
        out, atten = model(X + torch.mul(delta, mask))
        loss = criterion(out, y)
        if args["attack_mode"] == "Attention":
            grad = torch.autograd.grad(loss, delta, retain_graph=True)[0]
            ce_loss_grad_temp = grad.view(X.size(0), -1).detach().clone()
            range_list = range(len(atten) // 2)
            for atten_num in range_list:
                if atten_num == 0:
                    continue
                atten_map = atten[atten_num]
                atten_map = atten_map.mean(dim=1)
                atten_map = atten_map.view(-1, atten_map.size(-1))
                atten_map = -torch.log(atten_map)
                atten_loss = F.nll_loss(atten_map, max_patch_index_matrix + 1)
                atten_grad = torch.autograd.grad(atten_loss, delta, retain_graph=True)[0]
                atten_grad_temp = atten_grad.view(X.size(0), -1)
                cos_sim = F.cosine_similarity(atten_grad_temp, ce_loss_grad_temp, dim=1)
                atten_grad = authors_pcgrad(atten_grad_temp, ce_loss_grad_temp, cos_sim, grad.shape)
                grad += atten_grad * args["atten_loss_weight"]
        else:
            grad = torch.autograd.grad(loss, delta)[0]
        opt.zero_grad()
        delta.grad = -grad
        opt.step()
        scheduler.step()
        delta.data = torch.max(torch.min(delta, (1 - mu) / std), (0 - mu) / std)
    return X + torch.mul(delta, mask), max_patch_index


def authors_pcgrad(atten_grad, ce_grad, sim, shape):
    pcgrad = atten_grad[sim < 0]
    temp_ce_grad = ce_grad[sim < 0]
    dot_prod = torch.mul(pcgrad, temp_ce_grad).sum(dim=-1)
    dot_prod = dot_prod / torch.norm(temp_ce_grad, dim=-1)
    pcgrad = pcgrad - dot_prod.view(-1, 1) * temp_ce_grad
    atten_grad[sim < 0] = pcgrad
    atten_grad = atten_grad.view(shape)
    return atten_grad


@pytest.mark.parametrize("mode", ["attention", "ce"])
def test_patchfool_equals_the_authors_loop(tiny, mode):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    steps = 23  # crosses two StepLR boundaries
    atk = PatchFool(tiny, attack_mode=mode, steps=steps, seed=7)
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))  # the attack's own first draw
    mu, std = tiny.mean.reshape(3, 1, 1), tiny.std.reshape(3, 1, 1)

    class Model(torch.nn.Module):  # the authors' DeiT: normalised images -> (logits, attention maps)
        def __init__(self):
            super().__init__()
            self.parts = tiny

        def forward(self, xn):
            return self.parts.encode_with_attention(self.parts.patch_embed(xn * std + mu))

    model = Model()

    args = dict(atten_select=4, num_patch=1, attack_learning_rate=0.22, step_size=10, gamma=0.95,
                train_attack_iters=steps, attack_mode="Attention" if mode == "attention" else "CE_loss",
                atten_loss_weight=0.002)
    adv_n, idx = authors_patch_fool(model, (x - mu) / std, y, start, mu, std, args, 4, 17)
    want = adv_n.detach() * std + mu
    got = atk(x, y)
    assert (got - want).abs().max() < 1e-5
    changed = (got - x).abs().flatten(1).gt(1e-6).reshape(4, 3, 4, 4, 4, 4).any(1).any(2).any(3)  # (B, 4, 4)
    assert changed.flatten(1).sum(1).le(1).all()  # only the chosen patch moved
    assert changed.flatten(1).float().argmax(1).tolist() == idx[:, 0].tolist()


def test_attention_term_is_used(tiny):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    a = PatchFool(tiny, attack_mode="attention", steps=15, seed=7)(x, y)
    c = PatchFool(tiny, attack_mode="ce", steps=15, seed=7)(x, y)
    assert (a - c).abs().max() > 1e-4  # 6 blocks: blocks 1 and 2 add their attention gradients
    assert PatchFool.attention_layers(12) == [1, 2, 3, 4, 5] and PatchFool.attention_layers(2) == []


def test_patchfool_fools_the_digits_model():
    parts, test = load_model("digits_vit"), digits("test")
    x, y = test.images[:32], test.labels[:32]
    xa = PatchFool(parts, steps=40)(x, y)
    assert xa.min() >= 0 and xa.max() <= 1
    changed = (xa != x).flatten(2).any(1).reshape(32, 4, 8, 4, 8).any(4).any(2).sum((1, 2))  # changed 8x8 patches
    assert int(changed.max()) <= 1
    with torch.no_grad():
        assert (parts(xa).argmax(-1) == y).float().mean() < (parts(x).argmax(-1) == y).float().mean() - 0.2


def test_patchfool_lite_is_the_separate_fast_variant():
    parts, test = load_model("digits_vit"), digits("test")
    x, y = test.images[:16], test.labels[:16]
    xa = patchfool_lite(parts, x, y, steps=5, generator=torch.Generator().manual_seed(0))
    assert xa.min() >= 0 and xa.max() <= 1 and xa.shape == x.shape
    assert patch_mask(parts, torch.tensor([[0], [15]])).sum((1, 2, 3)).tolist() == [64.0, 64.0]

    # it changes only the patch that receives the most attention, and (attention term weighted up)
    # raises the attention that very token receives (aimed one token off, by the class token, it fell)
    def received(xx):
        with torch.no_grad():
            _, maps = parts.encode_with_attention(parts.patch_embed(xx))
        return torch.stack([m.mean(1).mean(1) for m in maps]).mean(0)  # (B, tokens)

    p0, b = parts.num_prefix_tokens, torch.arange(len(x))
    r0 = received(x)
    idx = r0[:, p0:].argmax(1)
    xa = patchfool_lite(parts, x, y, steps=5, attn_weight=1e3, generator=torch.Generator().manual_seed(0))
    assert not ((xa != x).any(1) & ~patch_mask(parts, idx[:, None]).bool()[:, 0]).any()
    assert bool((received(xa)[b, idx + p0] > r0[b, idx + p0]).all())


def test_suite_defaults_are_the_class_signature_and_need_no_torchattacks():
    """The suite's copy of PatchFool's defaults (kept apart so that importing nsvit_fast.eval, as
    every command does, skips torchattacks and scipy) equals the class's signature."""
    import inspect
    import subprocess
    import sys

    from nsvit_fast.eval.attacks import PATCHFOOL, PATCHFOOL_DEFAULTS

    sig = inspect.signature(PatchFool.__init__).parameters
    assert PATCHFOOL_DEFAULTS == {k: p.default for k, p in sig.items() if k not in ("self", "model", "seed")}
    assert PATCHFOOL.batch_size == 64  # the authors' main.py --batch_size: their PCGrad step depends on it
    code = "import sys, nsvit_fast.eval, nsvit_fast.cli; print(sorted({'torchattacks', 'scipy'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_suite_entries_and_bad_settings(tiny):
    assert parse_suite("patchfool") == ("patchfool", {
        "num_patch": 1, "patch_select": "attn", "atten_select": 4, "attack_mode": "attention",
        "atten_loss_weight": 0.002, "lr": 0.22, "steps": 250, "step_size": 10, "gamma": 0.95})
    assert parse_suite("patchfool:attack_mode=ce,steps=5")[1]["attack_mode"] == "ce"
    assert parse_suite("patchfool_lite")[1] == {"n_patches": 1, "steps": 30}
    with pytest.raises(NsvitError, match="attack_mode must be"):
        PatchFool(tiny, attack_mode="CE")
    with pytest.raises(NsvitError, match="num_patch must be"):
        PatchFool(tiny, num_patch=17)
    with pytest.raises(NsvitError, match="atten_select must be a block index in 0..5"):
        PatchFool(tiny, atten_select=6, steps=1)(torch.rand(1, 3, 16, 16), torch.tensor([0]))


def test_suite_runs_the_authors_attack():
    parts, test = load_model("digits_vit"), digits("test")
    rep = evaluate({"m": parts}, test, ["patchfool:steps=3"], max_images=8, progress=False)
    rec = [r for r in rep.records if r.suite == "patchfool"]
    assert rec and "attack_mode=attention" in rec[0].setting and 0 <= rec[0].value <= 100  # accuracy in %


def test_attack_accuracy_runs_patchfool_by_name_as_its_suite_does():
    # README: attack_accuracy is the one loop that runs any attack; "patchfool" was an unknown attack there
    from nsvit_fast import digits, load_model
    from nsvit_fast.eval import attack_accuracy, evaluate

    parts, d = load_model("digits_vit"), digits("test").subset(8)
    for name in ("patchfool", "patchfool_lite"):
        acc = attack_accuracy(parts, d.images, d.labels, name, steps=2, seed=3)
        rep = evaluate(parts, d, [f"{name}:steps=2"], seed=3, progress=False)
        assert [r.value for r in rep.records if r.suite == name] == [pytest.approx(100 * acc)], name

"""The adapter boundary: encode(patch_embed(x)) == model(normalise(x)) for every supported variant."""

import re

import pytest
import torch
from torch import nn

from nsvit_fast import NsvitError, adapt, load_model
from nsvit_fast.models.registry import FAMILIES

# (timm name, constructor overrides): real architectures, random init; depth cut where it only costs time
VARIANTS = [
    ("vit_tiny_patch16_224", {}),                            # the full depth once: the rest cut it
    ("vit_small_patch16_224", {"depth": 2}),
    ("vit_base_patch16_224", {"depth": 2}),
    ("vit_small_patch32_224", {"depth": 2}),
    ("vit_base_patch16_gap_224", {"depth": 2}),              # global average pool, fc_norm, no cls
    ("vit_medium_patch16_reg4_gap_256", {"depth": 2}),       # 4 register tokens, img 256
    ("vit_base_patch16_siglip_224", {"depth": 2, "num_classes": 10}),  # attention pooling head ('map')
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),                 # cls + distillation token, two heads
    ("deit3_small_patch16_224", {"depth": 2}),               # no_embed_class
    ("vit_tiny_patch16_224", {"img_size": 160}),             # non-224 input size
    ("vit_tiny_patch16_224", {"img_size": 96, "dynamic_img_size": True}),  # NHWC patch embed
]


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}{'-' + '-'.join(f'{k}{v}' for k, v in kw.items()) if kw else ''}" for n, kw in VARIANTS])
def test_encode_of_patch_embed_equals_model(name, kw):
    torch.manual_seed(0)
    parts = load_model(name, **kw)
    c, h, w = parts.data_config["input_size"]
    x = torch.rand(2, c, h, w)
    u = parts.patch_embed(x)
    assert u.shape == (2, parts.num_patches, parts.embed_dim)
    with torch.no_grad():
        ref = parts.model(parts.normalize(x))
        got = parts.encode(parts.patch_embed(x))
    assert got.shape == ref.shape == (2, parts.num_classes)
    assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())


def test_noise_at_insertion_point_changes_output():
    # the insertion point is live: tokens feed the output (guards against an encode that ignores u)
    parts = load_model("vit_tiny_patch16_224", depth=2)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        u = parts.patch_embed(x)
        v = torch.randn(u.shape[1:], generator=torch.Generator().manual_seed(0))
        assert (parts.encode(u + v) - parts.encode(u)).abs().max() > 1e-3
        # ...but a shift constant over the D features is removed by every pre-norm LayerNorm
        assert (parts.encode(u + 0.5) - parts.encode(u)).abs().max() < 1e-5


def test_normalisation_from_timm_data_config():
    from timm.data import resolve_model_data_config

    for name in ("vit_tiny_patch16_224", "deit_tiny_patch16_224"):
        parts = load_model(name, depth=1)
        cfg = resolve_model_data_config(parts.model)
        assert parts.data_config["mean"] == pytest.approx(cfg["mean"])
        assert parts.data_config["std"] == pytest.approx(cfg["std"])
    # deit uses ImageNet statistics, augreg ViT uses 0.5: the adapter must not hard-code either
    assert load_model("deit_tiny_patch16_224", depth=1).data_config["std"][0] == pytest.approx(0.229)
    assert load_model("vit_tiny_patch16_224", depth=1).data_config["std"][0] == pytest.approx(0.5)


def test_unsupported_models_give_one_line_reasons():
    import timm

    with pytest.raises(NsvitError, match="not a supported family"):
        adapt(timm.create_model("resnet18"))
    with pytest.raises(NsvitError, match="non-linear patch stem"):
        adapt(timm.create_model("vit_small_r26_s32_224"))
    m = timm.create_model("vit_tiny_patch16_224", depth=1)
    m.patch_embed.proj = nn.Conv2d(3, 192, kernel_size=16, stride=8, padding=4)
    with pytest.raises(NsvitError, match="overlapping"):
        adapt(m)
    m = timm.create_model("vit_tiny_patch16_224", depth=1)
    m.patch_embed.norm = nn.LayerNorm(192)  # a norm in the stem: the patch map is no longer linear
    with pytest.raises(NsvitError, match="ends in a LayerNorm, which is not linear"):
        adapt(m)
    x = torch.rand(2, 3, 224, 224)
    for arch, kw, got in (("vit_tiny_patch16_224", dict(global_pool=""), "global_pool=''"),
                          ("vit_tiny_patch16_224", dict(num_classes=0), "num_classes=0"),
                          ("eva02_tiny_patch14_224", dict(num_classes=0), "num_classes=0")):
        parts = adapt(timm.create_model(arch, depth=1, **kw))  # logits per token, or features: no logits
        u = parts.patch_embed(x)  # the patch embedding (and so the exact nullspace) needs no head
        with pytest.raises(NsvitError, match=f"must end in a classifier giving logits .B, classes., got .*{got}"):
            parts.encode(u)
        with pytest.raises(NsvitError, match="must end in a classifier"):
            parts(x)
    for arch in ("eva02_tiny_patch14_224", "vit_tiny_patch16_224"):  # a classifier passes
        assert adapt(timm.create_model(arch, depth=1, num_classes=3))(x).shape == (2, 3)


def test_wrong_image_size_is_a_clear_error(digits_parts):
    with pytest.raises(NsvitError, match=r"takes images \(B, 3, 32, 32\)"):
        digits_parts.patch_embed(torch.rand(1, 3, 64, 64))
    with pytest.raises(NsvitError, match="patch tokens must be"):
        digits_parts.encode(torch.rand(1, 5, 96))


def test_unknown_name_suggests_near_names():
    with pytest.raises(NsvitError, match="did you mean.*vit_small_patch16_224"):
        load_model("vit_smal_patch16_224")


def test_pretrained_offline_fails_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # an empty cache, else weights a runner cached would load; read at import, so set on the module
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(NsvitError, match="could not get pretrained weights") as e:
        load_model("vit_tiny_patch16_224", pretrained=True)
    assert "\n" not in str(e.value)


# timm's Eva class: EVA-02 and the RoPE ViTs built on it (random init, small sizes for speed)
EVA_VARIANTS = [
    ("eva02_tiny_patch14_224", {"img_size": 64, "patch_size": 16, "depth": 2, "num_classes": 10}),  # abs + RoPE, SwiGLU
    ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 2, "num_classes": 10, "dynamic_img_size": True}),  # NHWC
    ("vit_small_patch16_rope_224", {"img_size": 64, "depth": 2}),        # axial RoPE only, class token pool
    ("vit_small_patch16_rope_mixed_224", {"img_size": 64, "depth": 2}),  # learned mixed RoPE, one per block
    ("vit_small_patch16_rope_ape_224", {"img_size": 64, "depth": 2}),    # RoPE + absolute embedding
    ("vit_medium_patch16_rope_reg1_gap_256", {"img_size": 64, "depth": 2}),  # a register, no class token
]
EVA_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in EVA_VARIANTS]


def _eva(name, kw):
    torch.manual_seed(0)
    parts = load_model(name, **kw)
    with torch.no_grad():
        # timm starts the RoPE ViTs with layer scale 1e-5 and a head giving ~1e-3 logits: with
        # layer scale 1 the blocks matter, and O(1) logits make a 1e-6 bound a real one
        for n, p in parts.model.named_parameters():
            if n.split(".")[-1] in ("gamma_1", "gamma_2"):
                p.fill_(1.0)
        torch.nn.init.normal_(parts.model.head.weight)
    return parts


@pytest.mark.parametrize("name,kw", EVA_VARIANTS, ids=EVA_IDS)
def test_eva_encode_of_patch_embed_equals_model(name, kw):
    parts = _eva(name, kw)
    assert type(parts).__name__ == "EvaAdapter" and parts.family == "eva"
    c, h, w = parts.data_config["input_size"]
    x = torch.rand(2, c, h, w)
    with torch.no_grad():
        u = parts.patch_embed(x)
        ref = parts.model(parts.normalize(x))
        got = parts.encode(u)
        assert u.shape == (2, parts.num_patches, parts.embed_dim)
        assert got.shape == ref.shape == (2, parts.num_classes) and ref.abs().max() > 0.1
        assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
        # the insertion point is live, and RoPE rotates noise and tokens alike (positions, not values)
        v = torch.randn(u.shape[1:], generator=torch.Generator().manual_seed(0))
        assert (parts.encode(u + v) - got).abs().max() > 1e-3
        assert torch.equal(parts.encode_noisy(u, v[None], include_clean=True), parts.encode(torch.cat([u, u + v])))


def test_eva_nullspace_noise_leaves_outputs_unchanged():
    from nsvit_fast import nullspace_basis, verify_invariance

    parts = _eva(*EVA_VARIANTS[0]).double()
    ns = nullspace_basis(parts)
    assert ns.dim == 3 * 16 * 16 - 192  # C r^2 - D for EVA-02 Ti at patch 16
    x = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    v = ns.sample(4, norm=1.0, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = v * 10 * x.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    inv = verify_invariance(parts, x, v)
    assert inv["noise_to_image_norm"] >= 10 - 1e-9
    assert inv["patch_embed_rel"] <= 1e-10 and inv["logits_rel"] <= 1e-10
    rnd = torch.randn_like(v) * (v.flatten(1).norm(dim=1) / 64 / 3 ** 0.5).reshape(-1, 1, 1, 1)
    assert verify_invariance(parts, x, rnd)["logits_rel"] > 0.01  # the check can fail


# one small example per family of nsvit_fast.models.registry.FAMILIES: a new family adds one here
FAMILY_EXAMPLES = {"vit": ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}), "eva": EVA_VARIANTS[0]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_meets_the_adapter_contract(family):
    """For each registered family: encode(patch_embed(x)) is the model, the insertion point is live,
    encode_noisy is encode of the noisy tokens, and exact-nullspace noise ten times the image's norm
    leaves the logits unchanged (fp64) where random noise of the same size does not."""
    from nsvit_fast import nullspace_basis, verify_invariance

    assert family in FAMILY_EXAMPLES, f"add a small {family} model to FAMILY_EXAMPLES"
    parts = _eva(*FAMILY_EXAMPLES[family])
    assert parts.family == family
    x = torch.rand(2, *parts.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        u = parts.patch_embed(x)
        ref = parts.model(parts.normalize(x))
        got = parts.encode(u)
        assert ref.abs().max() > 0.1 and (got - ref).abs().max() <= 1e-6 * ref.abs().max()
        v = torch.randn(u.shape[1:], generator=torch.Generator().manual_seed(1))
        assert (parts.encode(u + v) - got).abs().max() > 1e-3
        vs = torch.stack([v, -2 * v])  # two noises: rows noise-major, after the clean ones
        torch.testing.assert_close(parts.encode_noisy(u, vs, include_clean=True),
                                   parts.encode(torch.cat([u, u + vs[0], u + vs[1]])), rtol=1e-5, atol=1e-5)
    parts = parts.double()
    n = nullspace_basis(parts).sample(2, norm=1.0, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x.double()
    n = n * 10 * x.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    assert verify_invariance(parts, x, n)["logits_rel"] <= 1e-10
    rnd = torch.randn(n.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rnd = rnd * (n.flatten(1).norm(dim=1) / rnd.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    assert verify_invariance(parts, x, rnd)["logits_rel"] > 0.01


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}),
                                     ("vit_base_patch16_gap_224", {"img_size": 64, "depth": 2}),
                                     EVA_VARIANTS[0], EVA_VARIANTS[5]],
                         ids=["vit", "vit-gap", "eva02", "rope-reg-gap"])
def test_adapter_interface_for_every_family(name, kw):
    # what analysis and attacks read through the adapter: maps, hidden states, class token, transforms
    parts = _eva(name, kw) if name in dict(EVA_VARIANTS) else load_model(name, **kw)
    x = torch.rand(2, *parts.data_config["input_size"])
    u = parts.patch_embed(x).requires_grad_()
    ref = parts.encode(u).detach()
    t = parts.num_prefix_tokens + parts.num_patches
    for in_graph in (False, True):
        logits, maps = parts.encode_with_attention(u, in_graph=in_graph)
        assert (logits - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
        assert len(maps) == 2 and maps[0].shape[0] == 2 and maps[0].shape[2:] == (t, t)
        assert torch.allclose(maps[-1].sum(-1), torch.ones(()), atol=1e-5)
        du, = torch.autograd.grad(maps[-1][..., 0].sum(), u, retain_graph=True)  # column: rows sum to 1
        assert du.abs().max() > 1e-6  # differentiable with respect to the tokens
        if in_graph:  # the logits were computed from these very maps
            g = torch.autograd.grad(logits.sum(), maps)
            assert all(gi.abs().max() > 0 for gi in g)
    logits, hidden = parts.encode_with_hidden(u)
    assert len(hidden) == 2 and hidden[-1].shape == (2, t, parts.embed_dim)
    assert torch.autograd.grad(logits.sum(), hidden[-1])[0].abs().max() > 0
    assert parts.has_class_token == (name not in ("vit_base_patch16_gap_224", "vit_medium_patch16_rope_reg1_gap_256"))
    cfg = parts.data_config
    assert {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"} <= set(cfg)
    assert cfg["crop_pct"] == parts.model.pretrained_cfg["crop_pct"]
    # nothing left behind: the fused attention is back, no hook stays on
    assert all(getattr(b.attn, "fused_attn", True) for b in parts.model.blocks)
    assert not any(b._forward_pre_hooks or any(m._forward_hooks for m in b.modules()) for b in parts.model.blocks)


def test_architecture_record_rebuilds_the_model(tmp_path):
    from nsvit_fast import save_model

    parts = _eva(*EVA_VARIANTS[0])
    assert parts.arch == "eva02_tiny_patch14_224" and parts.model_kwargs == EVA_VARIANTS[0][1]
    save_model(parts, tmp_path / "m.safetensors")
    again = load_model(checkpoint=tmp_path / "m.safetensors")
    assert type(again) is type(parts) and again.arch == parts.arch and again.model_kwargs == parts.model_kwargs
    assert again.data_config == parts.data_config
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), parts(x))


def test_eva_synthesis_and_finetuning_run(tmp_path):
    from nsvit_fast import digits
    from nsvit_fast.synth import synthesize
    from nsvit_fast.train import finetune

    torch.manual_seed(0)
    parts = load_model("eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=96, num_heads=3, depth=2,
                       num_classes=10)
    train = digits("train").subset(128)
    bank = synthesize(parts, train, lim=1.0, max_steps=3, batch_size=32, heldout=0, progress=False)
    assert bank.noises.shape[1:] == parts.token_shape and bank.noises.abs().max() > 0
    before = {k: v.clone() for k, v in parts.weights().items()}
    res = finetune(parts, train, method="ns", rounds=1, model_steps=1, batch_size=32, lr=1e-4,
                   synth={"lim": 1.0, "max_steps": 3, "batch_size": 32, "heldout": 32}, out_dir=tmp_path,
                   progress=False)
    assert any(not torch.equal(before[k], v) for k, v in parts.weights().items())
    assert res.history[0]["noise_norm"] > 0
    again = load_model(checkpoint=tmp_path / "model.safetensors")
    assert type(again).__name__ == "EvaAdapter" and again.model_kwargs == parts.model_kwargs


def test_eva_saliency_maps():
    from nsvit_fast.analysis.saliency import METHODS, saliency

    parts = _eva(*EVA_VARIANTS[0])
    x = torch.rand(2, 3, 64, 64)
    for m in METHODS:
        s = saliency(parts, x, m)
        assert s.shape == (2, 4, 4) and s.min() == 0 and abs(float(s.max()) - 1) < 1e-6, m


def test_cli_nullspace_dispatches_to_the_eva_adapter(capsys):
    import json

    from nsvit_fast.cli import main

    assert main(["nullspace", "--model", "eva02_tiny_patch14_224", "--json"]) in (0, None)
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == "eva02_tiny_patch14_224" and row["nullspace_dim"] == 3 * 14 * 14 - 192


def test_adapt_keeps_the_models_mode_and_save_asks_for_unrecorded_settings(tmp_path):
    import timm

    from nsvit_fast import digits
    from nsvit_fast.models import create_model, save_model
    from nsvit_fast.synth import synthesize

    torch.manual_seed(0)
    # a new Module starts in train mode: synthesis "restored" it, training the user's eval model
    m = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_heads=6,
                          num_classes=10).eval()
    parts = adapt(m)
    assert not parts.training
    synthesize(parts, digits("train").images[:32], batch_size=16, max_steps=1, progress=False)
    assert not m.training
    # num_heads leaves every shape alone: the default build took the weights and answered otherwise
    f = save_model(parts, tmp_path / "m.safetensors")
    with pytest.raises(NsvitError, match="built outside nsvit-fast, with timm settings nobody recorded"):
        load_model(checkpoint=f)
    back = load_model("vit_tiny_patch16_224", checkpoint=f, depth=1, img_size=32, patch_size=8, num_heads=6)
    x = digits("test").images[:4]
    with torch.no_grad():
        assert torch.equal(back(x), parts(x))
    # a setting no file can hold (a class) is refused at save, not a TypeError
    silu = create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, act_layer=nn.SiLU)
    with pytest.raises(NsvitError, match="its setting act_layer=.* is not a JSON value"):
        save_model(silu, tmp_path / "s.safetensors")


@pytest.mark.parametrize("arch,kw", [
    ("deit3_small_patch16_224", {}),                                     # LayerScale, no_embed_class
    ("vit_tiny_patch16_224", {"reg_tokens": 2, "no_embed_class": True}),  # prefix outside the positions
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
])
def test_the_fused_token_path_is_the_model(arch, kw):
    """encode_noisy's fused first block (token assembly, then the block's own attention and MLP)
    against encode of u + v on families that take it: with LayerScale gammas far from 1 (dropping
    ls1 moved logits of size 0.87 by 0.31), prefix tokens outside the positional embedding, and
    no class token."""
    from nsvit_fast.models import create_model

    torch.manual_seed(0)
    m = create_model(arch, depth=2, img_size=32, patch_size=8, num_classes=5, embed_dim=64, num_heads=2, **kw).eval()
    for blk in m.model.blocks:
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                ls.gamma.data = torch.rand_like(ls.gamma) * 2
    assert m._fusable_first_block() is not None  # the fused path runs, not the plain one
    u = m.patch_embed(torch.rand(3, 3, 32, 32))
    v = torch.randn(2, *m.token_shape)
    with torch.no_grad():
        want = torch.cat([m.encode(u), m.encode(u + v[0]), m.encode(u + v[1])])
        torch.testing.assert_close(m.encode_noisy(u, v, include_clean=True), want, atol=1e-5, rtol=1e-5)


def test_encode_noisy_checks_and_the_fused_path_it_may_not_take():
    from nsvit_fast.models import create_model

    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=5).eval()
    u = vit.patch_embed(torch.rand(2, 3, 32, 32))
    with pytest.raises(NsvitError, match="noises are float64 but the weights are float32"):  # was "mixed dtype"
        vit.encode_noisy(u, torch.zeros(1, *vit.token_shape, dtype=torch.float64))
    # DeiT-distilled's _pos_embed leaves reg tokens out: the fused assembly put them in (a size error)
    d = create_model("deit_tiny_distilled_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=5,
                     reg_tokens=2).eval()
    u = d.patch_embed(torch.rand(2, 3, 32, 32))
    v = torch.randn(2, *d.token_shape)
    with torch.no_grad():
        assert torch.allclose(d.encode_noisy(u, v), torch.cat([d.encode(u + v[0]), d.encode(u + v[1])]), atol=1e-5)
    # a backend typo was ignored wherever the family runs unfused (pre-norm, EVA)
    clip = create_model("vit_base_patch16_clip_224", depth=1, img_size=32, patch_size=8, num_classes=5)
    with pytest.raises(NsvitError, match="no backend 'bogus'"):
        clip.encode_noisy(clip.patch_embed(torch.rand(1, 3, 32, 32)), torch.zeros(1, *clip.token_shape),
                          backend="bogus")
    # pixels past the last whole patch were dropped without a word
    with pytest.raises(NsvitError, match=r"img_size \(70, 70\) is not a multiple of the patch \(16, 16\)"):
        create_model("vit_tiny_patch16_224", depth=1, img_size=70)


_TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2, num_classes=10)


def test_attention_maps_refuse_blocks_that_are_not_one_softmax_per_head():
    # DiffAttention (vit_dwee...) failed in a reshape traceback, and in the graph gave 2 x heads maps
    # taken before timm combines them; a parallel block without .attn was "found NoneType"
    import timm

    from nsvit_fast.models import adapt

    for arch, msg, msg_graph in (("vit_dwee_patch16_reg1_gap_256", "found DiffAttention", "DiffAttention has two"),
                                 ("vit_base_patch16_xp_224", "found ParallelScalingBlock (no .attn)",
                                  "(a block without .attn)")):
        parts = adapt(timm.create_model(arch, **_TINY)).eval()
        u = parts.patch_embed(torch.rand(2, 3, 32, 32))
        with pytest.raises(NsvitError, match=re.escape(msg)):
            parts.encode_with_attention(u)
        with pytest.raises(NsvitError, match=re.escape(msg_graph)):
            parts.encode_with_attention(u, in_graph=True)
    plain = adapt(timm.create_model("vit_tiny_patch16_224", **_TINY)).eval()
    u = plain.patch_embed(torch.rand(2, 3, 32, 32))
    assert [m.shape for m in plain.encode_with_attention(u, in_graph=True)[1]] == [(2, 2, 17, 17)]


def test_a_pretrained_tag_and_its_data_config_survive_a_save_and_reload(tmp_path):
    # adapt() named the model without timm's tag, so the reload got the untagged default's crop (0.9
    # instead of 1.0), and loading by the tagged name was refused
    import timm

    from nsvit_fast import save_model
    from nsvit_fast.models import adapt

    tag = "deit3_small_patch16_224.fb_in22k_ft_in1k"
    parts = adapt(timm.create_model(tag, **_TINY))
    assert parts.name == "deit3_small_patch16_224" and parts.arch == tag and parts.data_config["crop_pct"] == 1.0
    save_model(parts, tmp_path / "m.safetensors")
    for name in ("deit3_small_patch16_224", tag):
        again = load_model(name, checkpoint=tmp_path / "m.safetensors", **_TINY)
        assert again.data_config == parts.data_config, name
    with pytest.raises(NsvitError, match="holds a deit3_small_patch16_224.fb_in22k_ft_in1k, not a vit_small"):
        load_model("vit_small_patch16_224", checkpoint=tmp_path / "m.safetensors", **_TINY)
    # timm's default tag adds nothing (a run recorded untagged must still resume), nor does a given name
    for built in ("deit3_small_patch16_224", "deit3_small_patch16_224.fb_in1k"):
        assert adapt(timm.create_model(built, **_TINY)).arch == "deit3_small_patch16_224", built
    assert adapt(timm.create_model("vit_tiny_patch16_224", **_TINY), name="x").arch == "x"


def test_distillation_training_mode_is_refused_not_returned_as_a_tuple():
    import timm

    from nsvit_fast.models import adapt

    m = timm.create_model("deit_tiny_distilled_patch16_224", **_TINY)
    m.set_distilled_training(True)
    parts = adapt(m).train()
    with pytest.raises(NsvitError, match="distillation training is on"):
        parts(torch.rand(2, 3, 32, 32))
    assert parts.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)  # timm averages the two heads in eval


def test_a_file_of_ema_weights_only_says_to_use_ema(tmp_path):
    from nsvit_fast.models.loading import read_weights

    sd = load_model("digits_vit").model.state_dict()
    torch.save({"state_dict_ema": sd}, tmp_path / "ema.pth")
    with pytest.raises(NsvitError, match=r"only EMA weights, state_dict_ema: add --use-ema"):
        read_weights(tmp_path / "ema.pth", False)
    assert read_weights(tmp_path / "ema.pth", True)[0].keys() == sd.keys()

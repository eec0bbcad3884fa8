"""The adapter boundary: encode(patch_embed(x)) == model(normalise(x)) for every supported variant."""

import pytest
import torch
from torch import nn

from nsvit_fast import NsvitError, adapt, load_model

# (timm name, constructor overrides): real architectures, random init; depth cut where it only costs time
VARIANTS = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("vit_base_patch16_224", {}),
    ("vit_small_patch32_224", {}),
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


def test_wrong_image_size_is_a_clear_error(digits_parts):
    with pytest.raises(NsvitError, match=r"takes images \(B, 3, 32, 32\)"):
        digits_parts.patch_embed(torch.rand(1, 3, 64, 64))
    with pytest.raises(NsvitError, match="patch tokens must be"):
        digits_parts.encode(torch.rand(1, 5, 96))


def test_unknown_name_suggests_near_names():
    with pytest.raises(NsvitError, match="did you mean.*vit_small_patch16_224"):
        load_model("vit_smal_patch16_224")


def test_pretrained_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NsvitError, match="could not get pretrained weights") as e:
        load_model("vit_tiny_patch16_224", pretrained=True)
    assert "\n" not in str(e.value)

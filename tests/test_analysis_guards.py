"""Guards on the analysis tools, the op dispatch and the fused token path that nothing else looked
at closely: the invariance ratio, a fingerprint's signed threshold and seeded challenges, the class
a targeted figure's saliency explains, backends chosen by device, and the fused path under
dropout. Each test was written against a one-line bug the suite let through (mutation review,
round 3)."""

import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model, verify_invariance


@pytest.fixture(scope="module")
def parts():
    return load_model("digits_vit")


def test_verify_invariance_reports_the_smallest_noise_to_image_ratio(parts):
    # its largest was reported: "noise 20x the image" where one image's was 10x
    x = digits("test").images[:2]
    noise = x * torch.tensor([10.0, 20.0]).view(2, 1, 1, 1)
    r = verify_invariance(parts, x, noise)
    assert r["noise_to_image_norm"] == pytest.approx(10.0, rel=1e-5)


def test_a_fingerprints_threshold_is_signed(parts, tmp_path):
    # a threshold edited to 0.99 (in range) verified an unrelated model: the digest left it out
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nsvit_fast.analysis import make_fingerprint
    from nsvit_fast.analysis.fingerprint import Fingerprint

    p = make_fingerprint(parts, digits("val").images, n=4).save(tmp_path / "fp.safetensors")
    with safe_open(str(p), framework="pt") as f:
        meta, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(t, str(tmp_path / "edited.safetensors"), metadata={**meta, "threshold": "json:0.99"})
    with pytest.raises(NsvitError, match="do not match the stored digest"):
        Fingerprint.load(tmp_path / "edited.safetensors")


def test_fingerprint_challenges_are_a_seeded_draw(parts):
    # the first n images were taken whatever the seed: two owners' fingerprints shared challenges
    from nsvit_fast.analysis import make_fingerprint

    images = digits("val").images
    a, b = (make_fingerprint(parts, images, n=6, seed=s) for s in (0, 1))
    assert not torch.equal(a.images, b.images)
    assert not torch.equal(a.images, images[:6])
    again = make_fingerprint(parts, images, n=6, seed=0)
    assert torch.equal(a.images, again.images)


def test_targeted_saliency_explains_the_source_class(parts, tmp_path, monkeypatch):
    # the result keeps the source's class, so its maps must explain that class, not the target's
    from PIL import Image

    from nsvit_fast.analysis import apps

    test = digits("test")
    src, tgt = (int((test.labels == c).nonzero()[0]) for c in (3, 8))
    paths = []
    for i in (src, tgt):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((test.images[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(paths[-1])
    asked = []
    real = apps.saliency
    monkeypatch.setattr(apps, "saliency", lambda p, img, m, target=None: asked.append(target) or real(p, img, m, target))
    apps.run_targeted(parts, str(paths[0]), str(paths[1]), tmp_path / "out.png", iters=5, maps=["gradcam"])
    with torch.no_grad():
        source_class = int(parts(test.images[src:src + 1]).argmax())
    assert source_class != int(parts(test.images[tgt:tgt + 1]).argmax())
    assert len(asked) == 3 and all(int(t) == source_class for t in asked)


def test_backends_are_chosen_by_the_device_asked_about(monkeypatch):
    # the CPU's order was used for every device: on a GPU the C++ extension ran in place of the kernels
    from nsvit_fast.ops import dispatch

    for o in dispatch.OPS.values():
        for b in o.available:
            monkeypatch.setitem(o.available, b, lambda d: True)
    monkeypatch.delenv("NSVIT_BACKEND", raising=False)
    named = ("nullspace_project", "prob_shift", "token_assembly")  # a new op brings its own order
    assert {op: dispatch.backend_for(op, "cuda") for op in named} == {
        "nullspace_project": "triton", "prob_shift": "triton", "token_assembly": "triton"}
    assert {op: dispatch.backend_for(op, "cpu") for op in named} == {
        "nullspace_project": "torch", "prob_shift": "cpp", "token_assembly": "torch"}


def test_the_fused_token_path_is_not_taken_under_dropout_in_training():
    # the fused op has no dropout: in training with pos_drop it would skip the model's own dropout
    from nsvit_fast.models import create_model

    m = create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=4, embed_dim=64,
                     num_heads=2, pos_drop_rate=0.5)
    assert m.eval()._fusable_first_block() is not None
    assert m.train()._fusable_first_block() is None

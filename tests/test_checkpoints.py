"""Weights in and out: safetensors with metadata, weights-only torch files, and the bad cases."""

import pytest
import torch

from nsvit_fast import NsvitError, load_model, save_model


def test_embedded_checkpoint_is_pretrained(digits_parts, digits_test):
    from nsvit_fast.pretrain import accuracy

    assert digits_parts.img_size == (32, 32) and digits_parts.patch_size == (8, 8)
    assert accuracy(digits_parts, digits_test.images, digits_test.labels) >= 0.97


def test_safetensors_round_trip(tmp_path, digits_parts, digits_test):
    p = save_model(digits_parts, tmp_path / "m.safetensors", {"note": "x"})
    again = load_model(checkpoint=p)  # arch and kwargs come from the metadata
    x = digits_test.images[:8]
    with torch.no_grad():
        assert torch.equal(again(x), digits_parts(x))
    assert again.data_config == digits_parts.data_config


def test_torch_file_weights_only(tmp_path):
    torch.manual_seed(1)
    src = load_model("vit_tiny_patch16_224", depth=1, num_classes=7)
    p = tmp_path / "m.pth"
    torch.save({"model": src.model.state_dict(), "epoch": 3}, p)
    got = load_model("vit_tiny_patch16_224", checkpoint=p, depth=1)
    assert got.num_classes == 7  # taken from the checkpoint's head
    assert torch.equal(got.model.head.weight, src.model.head.weight)


class Evil:  # any class: weights_only loading must refuse to build it
    pass


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    with pytest.raises(NsvitError, match="weights-only"):
        load_model("vit_tiny_patch16_224", checkpoint=p, depth=1)


def test_truncated_checkpoint(tmp_path, digits_parts):
    p = save_model(digits_parts, tmp_path / "m.safetensors")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NsvitError, match="truncated or corrupt"):
        load_model("digits_vit", checkpoint=tmp_path / "cut.safetensors")
    torch.save(digits_parts.model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:1000])
    with pytest.raises(NsvitError, match="truncated"):
        load_model("digits_vit", checkpoint=tmp_path / "cut.pt")


def test_missing_and_mismatched_checkpoints(tmp_path, digits_parts):
    with pytest.raises(NsvitError, match="checkpoint not found"):
        load_model("digits_vit", checkpoint=tmp_path / "nope.safetensors")
    p = save_model(digits_parts, tmp_path / "m.safetensors")
    with pytest.raises(NsvitError, match="holds a vit_tiny_patch16_224, not a vit_small_patch16_224"):
        load_model("vit_small_patch16_224", checkpoint=p)
    torch.save(digits_parts.model.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(NsvitError, match="does not fit this model"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "raw.pt")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    from nsvit_fast.io import atomic_path, write_text

    p = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]

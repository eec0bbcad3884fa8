import pytest

from nsvit_fast import load_model
from nsvit_fast.pretrain import PretrainConfig, accuracy, pretrain_digits


@pytest.mark.slow
def test_pretrain_reaches_97_percent_and_round_trips(tmp_path, digits_test):
    # the committed checkpoint's regeneration command, at its default settings (~40 s here)
    parts, m = pretrain_digits(PretrainConfig(seed=0), out=tmp_path / "d.safetensors", progress=False)
    assert m["test_acc"] >= 0.97
    again = load_model("digits_vit", checkpoint=tmp_path / "d.safetensors")
    assert accuracy(again, digits_test.images, digits_test.labels) == pytest.approx(m["test_acc"])

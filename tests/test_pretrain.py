from dataclasses import asdict

import pytest
import torch

from nsvit_fast import load_model
from nsvit_fast.io import load_tensors
from nsvit_fast.models import embedded
from nsvit_fast.pretrain import PretrainConfig, accuracy, pretrain_digits


@pytest.mark.slow
def test_pretrain_reproduces_the_committed_checkpoint(tmp_path, digits_parts, digits_test):
    # the committed checkpoint's regeneration command, at its default settings (~40 s here)
    _, meta = load_tensors(embedded.CHECKPOINT)
    committed = meta["metrics"]
    assert committed["config"] == asdict(PretrainConfig())  # the defaults are the committed run's settings
    parts, m = pretrain_digits(PretrainConfig(seed=0), out=tmp_path / "d.safetensors", progress=False)
    assert m["test_acc"] >= 0.97
    # its accuracy, within two images of 397 (test) and 200 (validation): round-off in another
    # BLAS or thread count may flip a borderline digit, a changed recipe moves more
    assert m["test_acc"] == pytest.approx(committed["test_acc"], abs=2 / 397)
    assert m["val_acc"] == pytest.approx(committed["val_acc"], abs=2 / 200)
    assert committed["test_acc"] == accuracy(digits_parts, digits_test.images, digits_test.labels)
    with torch.no_grad():
        p_new, p_old = parts(digits_test.images).softmax(-1), digits_parts(digits_test.images).softmax(-1)
    assert float((p_new.argmax(-1) == p_old.argmax(-1)).float().mean()) >= 0.98
    # accuracy alone misses a changed recipe: without label smoothing the test accuracy was the same
    # 99.50% and validation within 1 image, but the mean top probability rose from 0.904 to 0.982
    # (measured). Round-off moves it by far less (0.0 on this CPU: the retrain was bit-identical).
    assert float(p_new.max(-1).values.mean()) == pytest.approx(float(p_old.max(-1).values.mean()), abs=0.02)
    again = load_model("digits_vit", checkpoint=tmp_path / "d.safetensors")
    assert accuracy(again, digits_test.images, digits_test.labels) == pytest.approx(m["test_acc"])

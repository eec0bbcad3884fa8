from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import eval_pixels

from nsvit_fast import NsvitError, digits, load_data, synthetic
from nsvit_fast.data import ImageDataset


def test_digits_splits_are_fixed_disjoint_and_in_range():
    tr, va, te = digits("train"), digits("val"), digits("test")
    assert (len(tr), len(va), len(te)) == (1200, 200, 397)
    assert tr.images.shape[1:] == (3, 32, 32)
    for ds in (tr, va, te):
        assert ds.images.min() >= 0 and ds.images.max() <= 1
        assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # grey copied to RGB
        assert set(ds.labels.tolist()) == set(range(10))  # stratified
    allx = digits("all").images.flatten(1)
    # the three splits partition the 1797 images
    keys = {tuple(r.tolist()) for r in torch.cat([tr.images, va.images, te.images]).flatten(1)[:, ::7]}
    assert len(keys) == len({tuple(r.tolist()) for r in allx[:, ::7]})
    assert torch.equal(digits("test").images, te.images)  # fixed


def test_digits_upsampling_keeps_the_8x8_content():
    small = digits("test", size=8).images
    big = digits("test").images
    down = torch.nn.functional.avg_pool2d(big, 4)
    err = (down - small).abs().mean()
    other = (down - small.roll(1, 0)).abs().mean()  # each image against another digit
    assert err < 0.5 * other


def test_synthetic_is_learnable_and_seeded():
    a, b = synthetic(64, seed=3), synthetic(64, seed=3)
    assert torch.equal(a.images, b.images)
    # class templates are distinct: nearest class mean classifies most images
    means = torch.stack([a.images[a.labels == c].mean(0) for c in range(10)])
    d = ((a.images[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (d.argmin(1) == a.labels).float().mean() > 0.9


def test_image_folder_with_real_photos(tmp_path):
    from PIL import Image
    from skimage import data as skd

    for cls, fn in (("cat", skd.chelsea), ("coffee", skd.coffee), ("astronaut", skd.astronaut)):
        (tmp_path / cls).mkdir()
        Image.fromarray(fn()).save(tmp_path / cls / "0.png")
    from nsvit_fast import load_model

    parts = load_model("vit_tiny_patch16_224", depth=1)
    ds = load_data(str(tmp_path), parts=parts)
    assert ds.images.shape == (3, 3, 224, 224) and ds.classes == ["astronaut", "cat", "coffee"]
    assert ds.images.min() >= 0 and ds.images.max() <= 1 and ds.images.std() > 0.1
    with torch.no_grad():
        assert parts(ds.images).shape == (3, 1000)


def test_dot_files_are_not_images_and_a_whole_float_max_images_reads(tmp_path, digits_parts):
    # macOS copies leave ._x.png AppleDouble files beside images: read as images, they stopped the run
    from helpers import write_digits_folder

    (tmp_path / "train").mkdir()
    root = write_digits_folder(tmp_path / "train", n=40)
    first = next(p for p in sorted(root.rglob("*.png")))
    (first.parent / f"._{first.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble header
    ds = load_data(str(root), parts=digits_parts)
    assert len(ds) == 40
    assert len(load_data(str(root), parts=digits_parts, max_images=5.0)) == 5  # was linspace's TypeError


def test_folder_transform_follows_the_models_data_config(tmp_path):
    # resize / centre crop / interpolation come from the model's pretrained config: checked by hand
    # on non-square photos (cat 451x300, coffee 600x400) for timm's own setting and an edited one
    from PIL import Image
    from skimage import data as skd

    from nsvit_fast import image_folder, load_model

    for cls, fn in (("cat", skd.chelsea), ("coffee", skd.coffee)):
        (tmp_path / cls).mkdir()
        Image.fromarray(fn()).save(tmp_path / cls / "0.png")
    import timm

    from nsvit_fast.models.vit import VitAdapter

    parts = load_model("vit_tiny_patch16_224", depth=1)
    cfg = parts.data_config
    assert (cfg["crop_pct"], cfg["interpolation"]) == (0.9, "bicubic")
    outs = []
    for crop_pct, interp in ((0.9, "bicubic"), (1.0, "bilinear")):
        # a model whose data config has other transform settings: the adapter declares them
        parts = VitAdapter(timm.create_model("vit_tiny_patch16_224", depth=1), cfg["mean"], cfg["std"],
                           data_config={**cfg, "crop_pct": crop_pct, "interpolation": interp})
        assert (parts.data_config["crop_pct"], parts.data_config["interpolation"]) == (crop_pct, interp)
        ds = image_folder(tmp_path, parts)
        for i, (path, _) in enumerate(ds.samples):
            x = ds[i][0]
            assert x.shape == (3, 224, 224)
            assert torch.allclose(x, eval_pixels(path, 224, crop_pct, interp), atol=1e-6), (path, crop_pct)
        outs.append(ds[0][0])
    assert (outs[0] - outs[1]).abs().mean() > 0.01  # the setting matters


def test_data_bad_input(tmp_path):
    with pytest.raises(NsvitError, match="neither"):
        load_data(str(tmp_path / "missing"))
    with pytest.raises(NsvitError, match="no class folders"):
        from nsvit_fast import image_folder, load_model

        image_folder(tmp_path, load_model("vit_tiny_patch16_224", depth=1))
    with pytest.raises(NsvitError, match="NaN"):
        ImageDataset(torch.full((2, 3, 8, 8), float("nan")), torch.zeros(2))
    with pytest.raises(NsvitError, match=r"pixels in \[0, 1\]"):
        ImageDataset(torch.full((2, 3, 8, 8), 255.0), torch.zeros(2))
    with pytest.raises(NsvitError, match="empty"):
        ImageDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0))
    with pytest.raises(NsvitError, match="splits"):
        digits("dev")
    assert np.isfinite(digits("val").images.numpy()).all()


def test_16_bit_and_float_images_keep_their_brightness(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey at 255 (half scale reads white) and truncates float
    pixels (0.5 reads black); read_rgb scales them to 8 bits first. 8-bit files are unchanged."""
    from PIL import Image

    from nsvit_fast.data.folders import read_rgb

    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f.tif")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(np.full((8, 8), 40000, np.int32)).save(tmp_path / "i32.tif")
    want = (ramp * 255).round()
    for name in ("g16.png", "f.tif", "g8.png"):
        got = np.asarray(read_rgb(tmp_path / name), dtype=np.float64)
        assert got.shape == (8, 8, 3) and np.abs(got[..., 0] - want).max() <= 1, name
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # the case PIL's convert gets wrong
    assert np.asarray(read_rgb(tmp_path / "i32.tif")).mean() == pytest.approx(40000 / 257, abs=1)
    for bad in (float("nan"), float("inf")):  # no pixel value to give it: a bad image, not a black pixel
        a = ramp.astype(np.float32)
        a[3, 3] = bad
        Image.fromarray(a).save(tmp_path / "bad.tif")
        with pytest.raises(NsvitError, match="bad.tif is not a readable image .its float pixels hold NaN or inf"):
            read_rgb(tmp_path / "bad.tif")


def test_folder_labels_follow_the_models_class_names(tmp_path, digits_parts):
    """A folder read by sorted position shifted every label after a missing class (a val folder
    without "3" scored 33%). Where the model's class names are known (digits_vit: "0"-"9"; a
    1000-output model: ImageNet synsets), a folder's label is its name's output; dot-folders are
    not classes; names the model lacks next to ones it has are refused; a positional folder whose
    count differs from the outputs warns."""
    import warnings

    from helpers import save_pixels

    from nsvit_fast.data.stream import StreamingData

    test = digits("test")
    keep = [i for i in range(len(test)) if int(test.labels[i]) != 3][:60]
    root = tmp_path / "no3"
    for i in keep:
        (root / str(int(test.labels[i]))).mkdir(parents=True, exist_ok=True)
        save_pixels(test.images[i], root / str(int(test.labels[i])) / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()
    save_pixels(test.images[0], root / ".ipynb_checkpoints" / "0.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known names: no position warning
        ds = load_data(root, parts=digits_parts)
        stream = StreamingData(root, digits_parts, batch_size=8, augment="none")
    truth = {f"{i}.png": int(test.labels[i]) for i in keep}
    assert len(ds) == len(keep) and ds.classes == [str(c) for c in range(10)]
    folder = stream.dataset
    assert all(y == truth[Path(p).name] for p, y in folder.samples)  # the streamed path's labels too
    assert sorted(ds.labels.tolist()) == sorted(truth.values()) and 3 not in ds.labels.tolist()
    from nsvit_fast.eval import accuracy

    assert accuracy(digits_parts, ds.images, ds.labels) > 0.95  # positional labels scored about a third

    (root / "x").mkdir()  # a name the model lacks, beside ones it has
    save_pixels(test.images[0], root / "x" / "0.png")
    with pytest.raises(NsvitError, match="class folder 'x' is not one of the model's class names"):
        load_data(root, parts=digits_parts)

    other = tmp_path / "ab"  # names the model lacks: by position, with a warning (2 folders, 10 outputs)
    for c in ("a", "b"):
        (other / c).mkdir(parents=True)
        save_pixels(test.images[0], other / c / "0.png")
    with pytest.warns(UserWarning, match="2 class folders for a 10-output model, read by sorted position"):
        assert load_data(other, parts=digits_parts).labels.tolist() == [0, 1]


def test_official_augment_is_torchvisions_bilinear_crop_and_flip(tmp_path):
    """augment=official: per sample exactly torchvision's RandomResizedCrop(224) + RandomHorizontalFlip
    + ToTensor under that sample's seed (the official scripts' train transform); rrc_flip differs
    only by timm's pieces and the model's bicubic interpolation."""
    from PIL import Image
    from skimage import data as skd
    from torchvision import transforms as T

    from nsvit_fast import load_model
    from nsvit_fast.data.stream import SeededFolder, train_transform

    (tmp_path / "cat").mkdir()
    Image.fromarray(skd.chelsea()).save(tmp_path / "cat" / "0.png")
    parts = load_model("vit_tiny_patch16_224", depth=1)
    ds = SeededFolder(tmp_path, train_transform(parts, "official"), parts=parts)
    timm_ds = SeededFolder(tmp_path, train_transform(parts, "rrc_flip"), parts=parts)
    img = Image.open(tmp_path / "cat" / "0.png").convert("RGB")
    by_hand = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    for seed in (1, 2, 3):
        x, y = ds[(0, seed)]
        torch.manual_seed(seed)
        assert y == 0 and x.shape == (3, 224, 224) and torch.equal(x, by_hand(img))
        assert not torch.equal(x, timm_ds[(0, seed)][0])  # bicubic, timm's crop: not the same pixels
    assert not torch.equal(ds[(0, 1)][0], ds[(0, 2)][0])


def test_synthetic_data_is_drawn_at_the_models_input_size():
    # synth --model <a 224 model> --data synthetic failed on "takes images (B, 3, 224, 224), got (1, 3, 32, 32)"
    from nsvit_fast.data import load_data
    from nsvit_fast.models import create_model

    parts = create_model("vit_tiny_patch16_224", depth=1, img_size=64, patch_size=16, num_classes=10, embed_dim=64,
                         num_heads=2)
    ds = load_data("synthetic:val", parts=parts)
    assert ds.images.shape == (256, 3, 64, 64) and parts(ds.images[:2]).shape == (2, 10)
    assert load_data("synthetic:val").images.shape[-1] == 32  # without a model, as before

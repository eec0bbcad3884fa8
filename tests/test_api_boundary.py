"""The Python API refuses, in one NsvitError line, input it would otherwise answer wrongly.

Each case returned a value before (a review through the public API): uint8 or 0-255 images scored
as pixels, labels outside the classes counted wrong, a PGD of 0 steps called an attack, a noise of
the wrong norm, a hand-built config with a float step count... The nullspace cases are in
test_nullspace.py, the CLI's in test_hostile.py.
"""

import numpy as np
import pytest
import torch

import nsvit_fast as ns
from nsvit_fast import NsvitError


@pytest.fixture(scope="module")
def parts():
    return ns.load_model("digits_vit")


@pytest.fixture(scope="module")
def xy():
    d = ns.digits("test").subset(16)
    return d.images, d.labels


def _cases(parts, x, y):
    from nsvit_fast.analysis import make_fingerprint, saliency, watermark
    from nsvit_fast.eval import accuracy, attack_accuracy, corrupt, evaluate, mce, mce_imagenet
    from nsvit_fast.eval.source import TensorImages
    from nsvit_fast.synth import CleanCache, NoiseBank, SynthConfig, noise_effect, synthesize, synthesize_regularized
    from nsvit_fast.data.stream import StreamingData
    from nsvit_fast.train import finetune

    d = ns.ImageDataset(x, y)
    other = ns.digits("val").subset(16).images
    u = parts.patch_embed(x)
    return [
        # images: integer, 0-255, NaN, float64 labels, labels out of range or shape
        ("acc-uint8", lambda: accuracy(parts, (x * 255).to(torch.uint8), y), "got uint8"),
        # a bank or folder no listed suite reads was ignored; save / fingerprint of a name or a timm
        # model without an adapter raised AttributeError
        ("eval-bank-unused", lambda: evaluate(parts, d, ["clean"], bank=object(), progress=False),
         "bank must be a NoiseBank"),
        ("eval-bank-unlisted", lambda: evaluate(parts, d, ["clean"], bank=NoiseBank.__new__(NoiseBank),
                                                progress=False), "noisebank suite only"),
        ("eval-folder-unlisted", lambda: evaluate(parts, d, ["clean"], folders={"imagenet-rr": "/nonexistent"},
                                                  progress=False), "did you mean 'imagenet-r'"),
        ("device-images", lambda: ns.load_model("digits_vit").to("meta")(x), "images are on cpu, the model on meta"),
        ("device-tokens", lambda: parts.encode(u.to("meta")), "patch tokens are on meta, the model on cpu"),
        ("synth-spec-string", lambda: synthesize(parts, "digits"), r"load_data\('digits', parts=model\) reads it"),
        ("bank-save-suffix", lambda: NoiseBank(torch.ones(1, *parts.token_shape), torch.ones(1), torch.zeros(1),
                                               torch.ones(1), torch.ones(1, dtype=torch.long),
                                               torch.ones(1, dtype=torch.bool), torch.zeros(1)).save("/nonexistent/b.pt"),
         "give a .safetensors name"),  # it wrote safetensors under .pt, which torch.load cannot read
        ("eval-folder-for-clean", lambda: evaluate(parts, d, ["clean"], folders={"clean": "/nonexistent"},
                                                   progress=False), "suite 'clean' reads no folder"),
        ("save-name", lambda: ns.save_model("digits_vit", "/nonexistent/x.safetensors"), "a name: use load_model"),
        ("fingerprint-name", lambda: ns.weights_fingerprint("digits_vit"), "a name: use load_model"),
        ("acc-255", lambda: accuracy(parts, x * 255, y), r"pixels in \[0, 1\], got values in \[0, 255\]"),
        ("acc-nan", lambda: accuracy(parts, x * float("nan"), y), "NaN"),
        ("acc-label-high", lambda: accuracy(parts, x, y + 10), r"< 10 \(the model's outputs\)"),
        ("acc-label-neg", lambda: accuracy(parts, x, y - 10), "class indices >= 0"),
        ("acc-label-2d", lambda: accuracy(parts, x, y[:, None]), "1-D integer tensor"),
        ("acc-label-float", lambda: accuracy(parts, x, y.float()), "1-D integer tensor"),
        ("acc-lengths", lambda: accuracy(parts, torch.cat([x, x]), y), "16 labels for 32 images"),
        ("acc-batch-neg", lambda: accuracy(parts, x, y, batch_size=-1), "batch_size must be >= 1"),
        ("ds-labels-float", lambda: ns.ImageDataset(x, y.float() + 0.7), "1-D integer tensor"),
        ("ds-images-hwc", lambda: ns.ImageDataset(x.permute(0, 2, 3, 1), y), r"channels-last \(16, 32, 32, 3\)"),
        ("ds-labels-neg", lambda: ns.ImageDataset(x, y - 5), "class indices >= 0"),
        ("ds-labels-list", lambda: ns.ImageDataset(x, y.tolist()), "must be a torch tensor"),
        ("ds-images-numpy", lambda: ns.ImageDataset(x.numpy(), y), "must be a torch tensor"),
        ("ds-classes-few", lambda: ns.ImageDataset(x, y, classes=["a", "b"]), "one per label"),
        ("ds-classes-str", lambda: ns.ImageDataset(x, y, classes="abcdefghij"), "list of names"),
        ("ds-subset-neg", lambda: d.subset(-1), "n must be >= 1"),
        ("stream-workers-many", lambda: StreamingData("/nonexistent", parts, 8, 0, workers=300),
         r"workers must be in \[0, 256\], got 300"),  # accepted and capped by the CPUs without a word
        ("eval-named-set-path", lambda: evaluate(parts, "digits:test", ["clean"], progress=False),
         "for a named set pass load_data's ImageDataset"),  # "data folder not found: digits:test"
        ("digits-size", lambda: ns.digits("test", size=1.5), "size must be a whole number"),
        ("synthetic-n", lambda: ns.synthetic(n=-3), "n must be >= 1"),
        ("synthetic-classes", lambda: ns.synthetic(num_classes=0), "num_classes must be >= 1"),
        ("synthetic-noise", lambda: ns.synthetic(noise=float("inf")), "noise must be"),
        ("synthetic-seed", lambda: ns.synthetic(seed=2**70), "seed must be <="),
        ("patch-embed-uint8", lambda: parts.patch_embed((x * 255).to(torch.uint8)), "takes float pixels"),
        ("encode-noisy-2d", lambda: parts.encode_noisy(u, torch.zeros(16, 96)), r"noises must be \(M, 16, 96\)"),
        ("encode-noisy-none", lambda: parts.encode_noisy(u, None), "at least one noise"),
        ("encode-double", lambda: parts.encode(u.double()), "tokens are float64 but the weights are float32"),
        ("encode-int", lambda: parts.encode(u.long()), "must be a float tensor, got int64"),
        ("synth-half-model", lambda: synthesize(_low(torch.float16), d, max_steps=1, progress=False),
         "noise synthesis needs float32 weights, digits_vit's are float16"),
        ("ft-bf16-model", lambda: finetune(_low(torch.bfloat16), d, rounds=1), "finetuning needs float32 weights"),
        ("synth-init-count", lambda: synthesize(parts, d, init=torch.zeros(3, 16, 96), num_noises=2, max_steps=1,
                                                progress=False), "init holds 3 noise.* num_noises is 2"),
        # models
        ("adapt-std-nan", lambda: ns.adapt(_timm(), mean=[0.5] * 3, std=[float("nan")] * 3), "std must be"),
        ("adapt-255-stats", lambda: ns.adapt(_timm(), mean=[123.7, 116.3, 103.5], std=[58.4, 57.1, 57.4]),
         r"mean must be numbers in \[-10, 10\]"),
        ("adapt-adapter-mean", lambda: ns.adapt(parts, mean=[0] * 3, std=[1] * 3), "already adapted"),
        ("adapt-str", lambda: ns.adapt("digits_vit"), "use load_model"),
        ("adapt-std-text", lambda: ns.adapt(_timm(), std="x"), r"got \(0.5, 0.5, 0.5\) and 'x'"),  # was tensor([...])
        ("load-classes-float", lambda: ns.load_model("vit_tiny_patch16_224", num_classes=2.7, depth=1),
         "num_classes must be a whole number"),
        ("load-pretrained-str", lambda: ns.load_model("vit_tiny_patch16_224", pretrained="no"),
         "pretrained must be True or False"),
        ("load-name-int", lambda: ns.load_model(5), "model name must be a string"),
        # attacks and evaluation
        ("atk-255", lambda: attack_accuracy(parts, x * 255, y, "fgsm"), r"pixels in \[0, 1\]"),
        ("atk-labels", lambda: attack_accuracy(parts, x, y + 10, "fgsm"), "< 10"),
        ("atk-eps-nan", lambda: attack_accuracy(parts, x, y, "fgsm", eps=float("nan")), "eps must be a finite"),
        ("atk-eps-bool", lambda: attack_accuracy(parts, x, y, "fgsm", eps=True), "eps must be a number"),
        ("atk-steps-0", lambda: attack_accuracy(parts, x, y, "pgd", steps=0), "steps must be >= 1"),
        ("atk-alpha-neg", lambda: attack_accuracy(parts, x, y, "pgd", alpha=-1 / 255), "alpha must be"),
        ("atk-n-float", lambda: attack_accuracy(parts, x, y, "fgsm", n=2.5), "n must be a whole number"),
        ("atk-batch-0", lambda: attack_accuracy(parts, x, y, "fgsm", batch_size=0), "batch_size must be >= 1"),
        ("atk-unknown-key", lambda: attack_accuracy(parts, x, y, "fgsm", epsilon=0.1),
         "attack fgsm: .*unexpected keyword argument 'epsilon'"),
        ("eval-255", lambda: evaluate(parts, TensorImages(x * 255, y), ["clean"], progress=False), r"\[0, 1\]"),
        ("eval-suites-empty", lambda: evaluate(parts, d, [], progress=False), "non-empty list"),
        ("eval-max-0", lambda: evaluate(parts, d, ["clean"], max_images=0, progress=False), "max_images must be"),
        ("eval-seed", lambda: evaluate(parts, d, ["clean"], seed=1.5, progress=False), "seed must be"),
        ("eval-mce-ref", lambda: evaluate(parts, d, ["clean"], mce_reference="bogus", progress=False),
         "mce_reference must be one of"),
        ("eval-bank-str", lambda: evaluate(parts, d, ["clean"], bank="x", progress=False), "must be a NoiseBank"),
        ("eval-no-model", lambda: evaluate({}, d, ["clean"], progress=False), "at least one model"),
        ("corrupt-255", lambda: corrupt(x * 255, "gaussian_noise", 1), r"pixels in \[0, 1\]"),
        ("corrupt-severity-bool", lambda: corrupt(x, "gaussian_noise", True), "severity must be a whole"),
        ("corrupt-severity-float", lambda: corrupt(x, "gaussian_noise", 3.0), "severity must be a whole"),
        ("mce-percent", lambda: mce_imagenet({"gaussian_noise": [50] * 5}), "fractions in"),
        ("mce-empty", lambda: mce({}, {}), "at least one corruption"),
        ("mce-missing", lambda: mce({"a": [0.1]}, {}), "no errors for"),
        # synthesis
        ("synth-cache-other", lambda: synthesize(parts, d, cache=CleanCache(parts, other), max_steps=1,
                                                 progress=False), "CleanCache of this model over the training"),
        ("synth-cache-255", lambda: CleanCache(parts, x * 255), r"\[0, 1\]"),
        ("synth-boundary-iters", lambda: synthesize(parts, d, schedule="boundary", boundary_iters=0, progress=False),
         "boundary_iters must be >= 1"),
        ("synth-wd-neg", lambda: synthesize(parts, d, weight_decay=-5, progress=False), "weight_decay must be"),
        ("synth-seed-neg", lambda: synthesize(parts, d, seed=-1, progress=False), "seed must be >= 0"),
        ("synth-grow-neg", lambda: synthesize(parts, d, boundary_grow=-1.0, progress=False), "boundary_grow must be"),
        ("synth-config-float", lambda: synthesize(parts, d, config=SynthConfig(max_steps=2.5), progress=False),
         "max_steps must be a whole number"),
        ("synth-config-str", lambda: synthesize(parts, d, config=SynthConfig(eps="0.03"), progress=False),
         "eps must be a number"),
        ("synth-config-int", lambda: synthesize(parts, d, config=5, progress=False), "must be a SynthConfig"),
        ("synth-lam-str", lambda: synthesize_regularized(parts, d, lam="a", steps=1, progress=False), "lam must be"),
        ("synth-lam-empty", lambda: synthesize_regularized(parts, d, lam=[], steps=1, progress=False), "lam is empty"),
        # finetuning
        ("ft-config-dict-bad", lambda: finetune(parts, d, config={"rounds": 0}), "rounds must be >= 1"),
        ("ft-on-bad-image", lambda: finetune(parts, d, on_bad_image="bogus", rounds=1), "on_bad_image must be"),
        ("ft-pgd-eps", lambda: finetune(parts, d, method="pgd", pgd={"eps": 300.0}), r"pgd.eps must be in \[0, 1\]"),
        ("ft-val-tensor", lambda: finetune(parts, d, val_data=x), "val_data must be"),
        # analysis
        ("sal-255", lambda: saliency(parts, x[:2] * 255, "rollout"), r"\[0, 1\]"),
        ("sal-target-short", lambda: saliency(parts, x[:2], "chefer", target=torch.tensor([3])), "1 labels for 2"),
        ("sal-target-high", lambda: saliency(parts, x[:2], "gradcam", target=torch.tensor([20, 1])), "< 10"),
        ("wm-iters-0", lambda: watermark(parts, x[:2], other[:2], iters=0), "iters must be >= 1"),
        ("wm-strength-bool", lambda: watermark(parts, x[:2], other[:2], strength=True), "strength must be a number"),
        ("fp-size", lambda: make_fingerprint(parts, x[..., :24, :24], n=2), r"takes images \(B, 3, 32, 32\)"),
        ("fp-seed", lambda: make_fingerprint(parts, x, n=2, seed=-1), "seed must be >= 0"),
        ("fp-n-float", lambda: make_fingerprint(parts, x, n=2.5), "n must be a whole number"),
        ("folder-no-parts", lambda: ns.image_folder("/tmp", None), "needs the model's adapter"),
        ("load-data-parts-str", lambda: ns.load_data("/tmp", parts="digits_vit"), "must be the model's adapter"),
        ("noise-effect-rows", lambda: noise_effect(parts, torch.zeros(1, 16, 96), CleanCache(parts, x), max_rows=-5),
         "max_rows must be >= 1"),
    ]


def _low(dtype):
    """A fresh digits_vit whose weights were converted to ``dtype`` (not autocast)."""
    parts = ns.load_model("digits_vit")
    parts.model.to(dtype)
    return parts


def _timm():
    import timm

    return timm.create_model("vit_tiny_patch16_224", depth=1)


def test_every_api_case_is_one_nsvit_error(parts, xy):
    cases = _cases(parts, *xy)
    assert len({c[0] for c in cases}) == len(cases)
    failures = []
    for cid, call, msg in cases:
        try:
            call()
        except NsvitError as e:
            if not __import__("re").search(msg, str(e)) or "\n" in str(e):
                failures.append(f"{cid}: message {str(e)!r} does not match {msg!r}")
        except Exception as e:  # a traceback from deep inside: the case is not handled at the boundary
            failures.append(f"{cid}: {type(e).__name__}: {e}")
        else:
            failures.append(f"{cid}: no error")
    assert not failures, "\n".join(failures)


def test_good_input_still_answers(parts, xy):
    # the checks let the right input through, and float64 / float16 pixels are cast for the model
    from nsvit_fast.eval import accuracy, attack_accuracy

    x, y = xy
    assert accuracy(parts, x, y) == accuracy(parts, x.double(), y) == accuracy(parts, x.half().float(), y)
    assert 0 <= attack_accuracy(parts, x, y, "pgd", steps=1) <= 1
    assert ns.synthetic(n=4).classes == [str(c) for c in range(10)]
    u = parts.patch_embed(x)  # narrower tokens are promoted at the positional embedding
    assert torch.allclose(parts.encode(u.half()), parts.encode(u.half().float()))
    from nsvit_fast.synth import synthesize

    bank = synthesize(parts, ns.ImageDataset(x, y), num_noises=3, max_steps=1, progress=False)
    for i in (np.int64(1), torch.tensor(1), 1):  # any integer picks one noise; numpy's read (N, D) as N noises
        assert len(bank[i]) == 1 and torch.equal(bank[i].noises[0], bank.noises[1])


def test_weights_beyond_float32_and_nan_logits_are_refused(tmp_path, xy):
    # a float64 1e300 passed the finiteness check and became inf in the float32 model; a finite
    # 3e38 bias overflows in the encoder: both had scored a silent 3% accuracy from NaN logits
    from safetensors.torch import save_file

    from nsvit_fast.eval import accuracy

    sd = {k: v.double().contiguous() for k, v in ns.load_model("digits_vit").model.state_dict().items()}
    sd["blocks.0.attn.proj.bias"][0] = 1e300
    save_file(sd, str(tmp_path / "big.safetensors"))
    with pytest.raises(NsvitError, match="'blocks.0.attn.proj.bias' holds 1 NaN or inf .*beyond float32's range"):
        ns.load_model("digits_vit", checkpoint=tmp_path / "big.safetensors")
    sd = {k: v.float() for k, v in sd.items()}
    sd["blocks.0.attn.proj.bias"][0] = 3e38
    save_file(sd, str(tmp_path / "edge.safetensors"))
    with pytest.raises(NsvitError, match="NaN or inf logits"):
        accuracy(ns.load_model("digits_vit", checkpoint=tmp_path / "edge.safetensors"), *xy)


def test_a_folder_of_split_folders_is_refused_by_every_reader(tmp_path, parts):
    # evaluate / finetune / image_folder read train/ and val/ as two classes and scored or trained a
    # 2-class set without a word; only load_data (parse_spec) refused it
    from helpers import write_digits_folder

    from nsvit_fast.data import image_folder
    from nsvit_fast.data.stream import StreamingData
    from nsvit_fast.eval import evaluate
    from nsvit_fast.train import finetune

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_digits_folder(tmp_path / split, "train", 10)
    calls = {"evaluate": lambda: evaluate(parts, tmp_path, ["clean"], progress=False),
             "finetune": lambda: finetune(parts, tmp_path, rounds=1, model_steps=1, batch_size=8, method="plain",
                                          progress=False),
             "image_folder": lambda: image_folder(tmp_path, parts),
             "StreamingData": lambda: StreamingData(tmp_path, parts, 8),
             "load_data": lambda: ns.load_data(str(tmp_path), parts=parts)}
    for name, call in calls.items():
        with pytest.raises(NsvitError, match="holds the split folders train, val"):
            call()
    assert len(image_folder(tmp_path / "train", parts)) == 10  # a split folder itself reads
    two = tmp_path / "two"  # classes of images that happen to be named like splits are classes
    for c, i in (("test", 0), ("train", 1)):
        (two / c).mkdir(parents=True)
        (tmp_path / "train" / f"digit{int(ns.digits('train').labels[i])}" / f"{i}.png").rename(two / c / f"{i}.png")
    assert image_folder(two, parts).classes == ["test", "train"]


def test_data_kept_on_the_host_is_not_a_device_mismatch(xy):
    # the device check sat in check_images, which also checks data that stays on the host and is moved
    # batch by batch: a CUDA synthesize / finetune / CleanCache on CPU images was refused (meta stands in
    # for the accelerator here). The forward still refuses, and adapt() puts mean / std on the weights'
    import timm

    from nsvit_fast.synth import CleanCache
    from nsvit_fast.synth.engine import image_tensor

    x, _ = xy
    gpu = ns.load_model("digits_vit").to("meta")
    CleanCache(gpu, x)
    assert image_tensor(x, gpu) is x or torch.equal(image_tensor(x, gpu), x)
    with pytest.raises(NsvitError, match="images are on cpu, the model on meta"):
        gpu(x)
    adapted = ns.adapt(timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32).to("meta"))
    assert adapted.mean.device.type == adapted.std.device.type == "meta"

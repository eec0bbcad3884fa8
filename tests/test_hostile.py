"""Hostile input through the real CLI: every case exits 2 with exactly one stderr line starting
``nsvit-fast: error:``, and changes no file and leaves none behind.

Each case runs ``nsvit_fast.cli.main(argv)`` (what ``python -m nsvit_fast`` runs) in its own process:
one runner subprocess imports nsvit-fast once and forks a child per case, with the case's working
directory, environment and file-size limit, its stdout and stderr captured. Forking skips the
~3 s import per case (the subcommands' lazy imports included), which keeps ~145 cases to about
14 s on 2 cores; a few cases also go through ``python -m nsvit_fast`` itself. Two finetunes on
one folder are tested with real processes.
"""

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from helpers import free_port, run_forkrun, wait_for_port

# no $CXX: inductor may read it before the cases fork, and compile-no-cxx hides the compiler by PATH
ENV = {**{k: v for k, v in os.environ.items() if k != "CXX"},
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}



# -- hostile files --
def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that claims w x h pixels (a decompression bomb as PIL sees it before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _folder(root: Path, n: int = 3) -> Path:
    from PIL import Image

    for c in ("0", "1"):  # digits_vit's class names: labels by name, no position warning
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (40 * i, 100 if c == "0" else 200, 0)).save(root / c / f"{i}.png")
    return root


def _edit_tensors(src: Path, dst: Path, tensors=None, meta=None, drop=()):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        m = dict(f.metadata() or {})
        t = {k: f.get_tensor(k) for k in f.keys()}
    t.update(tensors or {})
    m.update(meta or {})
    for k in drop:
        t.pop(k, None)
        m.pop(k, None)
    save_file(t, str(dst), metadata=m)
    return dst


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nsvit_fast import digits, load_model, save_model
    from nsvit_fast.analysis.fingerprint import digest, make_fingerprint
    from nsvit_fast.models import embedded, weights_fingerprint
    from nsvit_fast.synth import NoiseBank

    a = tmp_path_factory.mktemp("assets")
    good = embedded.CHECKPOINT
    w = {k: v.clone() for k, v in load_model("digits_vit").model.state_dict().items()}
    nan_w = {**w, "head.bias": w["head.bias"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}
    _edit_tensors(good, a / "nan.safetensors", nan_w)
    _edit_tensors(good, a / "inf.safetensors", {"blocks.0.mlp.fc1.weight": w["blocks.0.mlp.fc1.weight"] * float("inf")})
    _edit_tensors(good, a / "badjson.safetensors", meta={"model_kwargs": "json:{broken"})
    _edit_tensors(good, a / "nokeys.safetensors", drop=("head.weight",))
    _edit_tensors(good, a / "zerohead.safetensors", {"head.weight": torch.zeros_like(w["head.weight"])})
    small = load_model(embedded.ARCH, **{**embedded.KWARGS, "depth": 2})
    save_model(small, a / "wrongarch.safetensors")
    (a / "truncated.safetensors").write_bytes(good.read_bytes()[:5000])
    (a / "random.safetensors").write_bytes(os.urandom(4096))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(a / "PWNED"),))
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, a / "evil.pt")
    (a / "adir.safetensors").mkdir()
    (a / "afile").write_text("a file, not a folder\n")

    m, n, d = 1, 16, 96
    noises = torch.randn(m, n, d)
    bank = NoiseBank(noises, noises.flatten(1).norm(dim=1), *(torch.ones(m) for _ in range(2)),
                     torch.ones(m, dtype=torch.long), torch.ones(m, dtype=torch.bool), torch.ones(m),
                     meta={"eps": 0.03, "model": "digits_vit",
                           "model_fingerprint": weights_fingerprint(load_model("digits_vit")),
                           "token_shape": [n, d]})
    bank.save(a / "bank.safetensors")
    for name, v in (("f8", noises.to(torch.float8_e4m3fn)), ("int", noises.long()), ("bool", noises > 0),
                    ("norm", noises * 2)):  # norm: the noise doubled, its recorded norm not
        _edit_tensors(a / "bank.safetensors", a / f"bank_{name}.safetensors", {"noises": v})
    _edit_tensors(a / "bank.safetensors", a / "bank_huge.safetensors",  # finite, recorded, and overflowing
                  {"noises": noises * 1e36, "norm": noises.double().flatten(1).norm(dim=1).mul(1e36).float()})
    _edit_tensors(a / "bank.safetensors", a / "bank_eps_text.safetensors", meta={"eps": "a|b\nc,d"})
    _edit_tensors(a / "bank.safetensors", a / "bank_nan.safetensors",
                  {"noises": torch.full((m, n, d), float("nan"))})
    _edit_tensors(a / "bank.safetensors", a / "bank_inf.safetensors",
                  {"noises": torch.full((m, n, d), float("inf"))})
    _edit_tensors(a / "bank.safetensors", a / "bank_missing.safetensors", drop=("norm",))
    # edits that passed: a zeroed noise scored a 100% match; a dropped fingerprint silenced the
    # other-weights warning; per-noise records out of range were read as given
    _edit_tensors(a / "bank.safetensors", a / "bank_zero.safetensors", {"noises": torch.zeros(m, n, d),
                                                                        "norm": torch.zeros(m)})
    _edit_tensors(a / "bank.safetensors", a / "bank_nofp.safetensors", drop=("model_fingerprint",))
    _edit_tensors(a / "bank.safetensors", a / "bank_shape_meta.safetensors", meta={"token_shape": "json:[17, 96]"})
    _edit_tensors(a / "bank.safetensors", a / "bank_conv_half.safetensors", {"converged": torch.full((m,), 0.5)})
    _edit_tensors(a / "bank.safetensors", a / "bank_steps_neg.safetensors", {"steps": torch.full((m,), -3)})
    _edit_tensors(a / "bank.safetensors", a / "bank_match_5.safetensors", {"match_rate": torch.full((m,), 5.0)})
    long = torch.randn(m, n + 1, d)
    _edit_tensors(a / "bank.safetensors", a / "bank_n17.safetensors",
                  {"noises": long, "norm": long.flatten(1).norm(dim=1)}, {"token_shape": f"json:[{n + 1}, {d}]"})

    parts = load_model("digits_vit")
    fp = make_fingerprint(parts, digits("val").images, n=8)
    fp.save(a / "fp.safetensors")
    zero = torch.zeros_like(fp.noise)
    _edit_tensors(a / "fp.safetensors", a / "fp_zero.safetensors", {"noise": zero})
    _edit_tensors(a / "fp.safetensors", a / "fp_zero_resigned.safetensors", {"noise": zero},
                  {"digest": digest(fp.images, zero, fp.control, fp.meta)})
    tiny = fp.noise * 1e-6
    _edit_tensors(a / "fp.safetensors", a / "fp_tiny_resigned.safetensors", {"noise": tiny},
                  {"digest": digest(fp.images, tiny, fp.control, fp.meta)})
    # re-signed edits: a scale past make's bound (scale x norm overflowed, so any noise passed and an
    # unrelated model verified), and a signed record that does not describe the tensors
    big = {**fp.meta, "scale": 1e308}
    _edit_tensors(a / "fp.safetensors", a / "fp_bigscale_resigned.safetensors", {"noise": tiny},
                  {"scale": "json:1e+308", "digest": digest(fp.images, tiny, fp.control, big)})
    _edit_tensors(a / "fp.safetensors", a / "fp_n_resigned.safetensors",
                  meta={"n": "json:9", "digest": digest(fp.images, fp.noise, fp.control, {**fp.meta, "n": 9})})
    size = {**fp.meta, "input_size": [3, 224, 224]}
    _edit_tensors(a / "fp.safetensors", a / "fp_size_resigned.safetensors",
                  meta={"input_size": "json:[3, 224, 224]", "digest": digest(fp.images, fp.noise, fp.control, size)})
    _edit_tensors(a / "fp.safetensors", a / "fp_thr_nan.safetensors", meta={"threshold": "json:NaN"})
    _edit_tensors(a / "fp.safetensors", a / "fp_thr_abc.safetensors", meta={"threshold": "abc"})
    _edit_tensors(a / "fp.safetensors", a / "fp_thr_big.safetensors", meta={"threshold": "json:5"})
    _edit_tensors(a / "fp.safetensors", a / "fp_nocontrol.safetensors", drop=("control",))
    _edit_tensors(a / "fp.safetensors", a / "fp_nodigest.safetensors", drop=("digest",))
    img = fp.images.clone()
    img[0, 0, 0, 0] = 1 - img[0, 0, 0, 0]
    _edit_tensors(a / "fp.safetensors", a / "fp_images.safetensors", {"images": img})
    _edit_tensors(a / "fp.safetensors", a / "fp_f8.safetensors", {"images": fp.images.to(torch.float8_e4m3fn)})
    half = {k: getattr(fp, k).half() for k in ("images", "noise", "control")}
    _edit_tensors(a / "fp.safetensors", a / "fp_f16_resigned.safetensors", half,
                  {"digest": digest(half["images"], half["noise"], half["control"], fp.meta)})
    _edit_tensors(a / "fp.safetensors", a / "fp_nan_noise.safetensors",
                  {"noise": fp.noise.clone().index_fill_(0, torch.tensor([1]), float("nan"))})

    _folder(a / "good")
    corrupt = _folder(a / "corrupt")
    big = _folder(a / "big_corrupt", n=110)  # past the 200 images where folders get a reading bar
    (big / "1" / "zz.jpg").write_bytes((big / "0" / "0.png").read_bytes()[:60])
    (corrupt / "0" / "9.jpg").write_bytes((corrupt / "0" / "0.png").read_bytes()[:60])  # truncated
    loop = _folder(a / "loop")
    os.symlink(loop / "0", loop / "0" / "again")
    bomb = _folder(a / "bomb")
    _png_header_only(bomb / "1" / "big.png", 20000, 20000)
    _png_header_only(a / "bomb.png", 20000, 20000)
    (a / "empty_classes" / "a").mkdir(parents=True)
    (a / "run_badlog").mkdir()
    (a / "run_badlog" / "log.jsonl").write_text('{"round": 0, "noise_norm": 1.0}\n{"round": 1, "noi')
    (a / "anchors.yaml").write_text("synth: &s {eps: 0.1}\nrounds: *s\n")
    (a / "list.yaml").write_text("- rounds\n- 3\n")
    (a / "bad.yaml").write_text("rounds: [1, 2\n")
    (a / "types.yaml").write_text("rounds: 2\nout: 5\n")
    (a / "dup.yaml").write_text("synth:\n  eps: 0.01\nrounds: 1\nsynth:\n  lim: 3.0\n")  # the 2nd block replaced the 1st
    (a / "yaml11int.yaml").write_text("model: digits_vit\nmodel_steps: 1_0\n")  # YAML 1.1's 10
    for c in ("0", "1"):  # every file unreadable: skip leaves nothing
        (a / "allbad" / c).mkdir(parents=True)
        (a / "allbad" / c / "x.png").write_bytes(b"")
    mixed = _folder(a / "mixed")  # digits_vit's class names, and one folder that is not one
    os.rename(mixed / "1", mixed / "x")
    (a / "demo_reportdir" / "report.md").mkdir(parents=True)
    ood = a / "ood_corrupt"  # all ten classes of digits_vit (named a-j), one image truncated
    for i, c in enumerate("abcdefghij"):
        (ood / c).mkdir(parents=True)
        (ood / c / "0.png").write_bytes((a / "good" / "0" / "0.png").read_bytes())
    (ood / "j" / "9.jpg").write_bytes((a / "good" / "0" / "0.png").read_bytes()[:60])
    sd = load_model("digits_vit").model.state_dict()
    torch.save({**sd, "head.weight": torch.zeros_like(sd["head.weight"], dtype=torch.int64)}, a / "intweight.pt")
    torch.save({**sd, "head.bias": sd["head.bias"].to_sparse()}, a / "sparse.pt")
    torch.save({**sd, "head.bias": torch.empty_like(sd["head.bias"], device="meta")}, a / "meta.pt")
    save_model(load_model(embedded.ARCH, **{**embedded.KWARGS, "num_classes": 5}), a / "five.safetensors")
    save_model(load_model("digits_vit"), a / "saved.safetensors")
    kw = json.dumps({**embedded.KWARGS, "global_pool": "max", "fc_norm": False})
    _edit_tensors(a / "saved.safetensors", a / "mean_edit.safetensors", meta={"mean": "json:[0.4, 0.4, 0.4]"})
    _edit_tensors(a / "saved.safetensors", a / "pool_edit_undigested.safetensors", meta={"model_kwargs": "json:" + kw},
                  drop=("record_digest",))
    save_model(load_model(embedded.ARCH, **embedded.KWARGS), a / "timm_saved.safetensors")  # a timm arch, not digits_vit
    save_model(load_model(embedded.ARCH, depth=1, img_size=32, patch_size=8, num_classes=10),
               a / "tiny_other.safetensors")  # not the digits model's settings: finetune asks for a config
    _edit_tensors(a / "timm_saved.safetensors", a / "nopool_undigested.safetensors",
                  meta={"model_kwargs": "json:" + json.dumps({**embedded.KWARGS, "global_pool": ""})},
                  drop=("record_digest",))
    for i in range(12):  # a folder of 12 classes for a 10-output model
        (a / "twelve" / f"c{i:02d}").mkdir(parents=True)
        (a / "twelve" / f"c{i:02d}" / "0.png").write_bytes((a / "good" / "0" / "0.png").read_bytes())
    (a / "demo_seed0" / "finetune" / "ns").mkdir(parents=True)  # a seed-0 demo's checkpoint header
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(a / "demo_seed0" / "finetune" / "ns" / "checkpoint.safetensors"),
              metadata={"config": json.dumps({"seed": 0, "rounds": 2, "model_steps": 5})})
    (a / "latin1.yaml").write_bytes("rounds: 1\n# caf\u00e9\n".encode("latin-1"))
    _edit_tensors(good, a / "f8.safetensors", {"head.bias": w["head.bias"].to(torch.float8_e4m3fn)})
    _edit_tensors(good, a / "std_tiny.safetensors", meta={"std": "json:[1e-30, 1e-30, 1e-30]"})
    _edit_tensors(good, a / "mean_huge.safetensors", meta={"mean": "json:[1e30, 0.5, 0.5]"})
    for name, text in (("list", "[1, 2]\n"), ("noround", '{"noise_norm": 1}\n'), ("wordround", '{"round": "a"}\n'),
                       ("wordnorm", '{"round": 0, "noise_norm": "big"}\n'), ("bare", '{"round": 0}\n')):
        (a / f"run_{name}").mkdir()
        (a / f"run_{name}" / "log.jsonl").write_text(text)
    (a / "run_latin1").mkdir()
    (a / "run_latin1" / "log.jsonl").write_bytes(b'{"round": 0, "note": "caf\xe9"}\n')
    return a


FT = ["finetune", "--quiet", "rounds=1", "model_steps=1", "batch_size=16", "max_images=32", "val_data=null",
      "method=plain"]
EV = ["eval", "--suite", "clean", "--max-images", "8", "--quiet"]


def ft(*items: str) -> list[str]:
    """FT with its own value of each KEY in ``items`` (KEY=VALUE) dropped: a key given twice is refused."""
    keys = {i.partition("=")[0] for i in items if "=" in i and not i.startswith("-")}
    return [a for a in FT if a.partition("=")[0] not in keys] + list(items)
SY = ["synth", "--max-images", "32", "--max-steps", "2", "--batch-size", "16", "--heldout", "8", "--quiet"]

# (id, argv, what the line must contain, options). {A}: the assets folder, {C}: the case's own folder.
CASES = [
    # arguments: one line from argparse, no usage block
    ("unknown-flag", ["nullspace", "--bogus"], "unrecognized arguments: --bogus (see nsvit-fast nullspace --help)",
     {}),  # it pointed at the top-level help, which lists no command's options
    ("eval-split-flag", ["eval", "--split", "test"], "eval takes the split in --data (digits:test", {}),
    ("dry-run-over-a-run", ["finetune", "--dry-run", "--quiet", "--out", "{A}/demo_seed0/finetune/ns"],
     "holds an earlier run (a dry run writes one too)", {}),  # it said: pass resume=True (--resume)
    ("analyze-stray-option", ["analyze", "trend", "--run", "{C}", "--m", "5"], "analyze trend takes no --m (it serves "
     "fig5)", {}),  # was ignored without a word
    ("missing-required", ["watermark"], "required: --image", {}),
    ("bad-choice", ["synth", "--mode", "turbo"], "invalid choice", {}),
    ("no-command-arg", ["analyze"], "required: study", {}),
    ("max-images-0", EV[:3] + ["--max-images", "0"], "--max-images: must be >= 1", {}),
    ("max-images-neg", ["synth", "--max-images", "-5"], "--max-images: must be >= 1", {}),
    ("max-images-word", ["eval", "--max-images", "ten"], "whole number", {}),
    ("pretrain-batch-0", ["pretrain", "--batch-size", "0"], "--batch-size: must be >= 1", {}),
    ("pretrain-epochs-neg", ["pretrain", "--epochs", "-1"], "--epochs", {}),
    ("pretrain-lr-nan", ["pretrain", "--lr", "nan"], "--lr: must be a finite number", {}),
    ("seeds-words", ["eval", "--seeds", "a,b"], "--seeds: 'a'", {}),
    ("seeds-empty", ["eval", "--seeds", ","], "--seeds", {}),
    ("seeds-neg", ["eval", "--seeds", "0,-1"], "--seeds", {}),
    ("folder-no-eq", ["eval", "--folder", "imagenet-r"], "SUITE=PATH", {}),
    ("lams-words", ["analyze", "fig3", "--lams", "a,b"], "--lams", {}),
    ("lams-nan", ["analyze", "fig3", "--lams", "1,nan"], "--lams", {}),
    # past ~1e20 AdamW's squared gradient overflowed, the noise never moved and Fig. 3 drew it
    ("lams-huge", ["analyze", "fig3", "--lams", "0,1e30"], "must be a finite number in [0, 1e+06]", {}),
    ("fig5-m-0", ["analyze", "fig5", "--m", "0"], "--m: must be >= 2", {}),
    ("fig5-pairs-0", ["analyze", "fig5", "--pairs", "0"], "--pairs", {}),
    ("demo-scale-neg", ["demo", "--scale", "-1", "--out", "{C}/d"], "--scale", {}),
    ("demo-scale-inf", ["demo", "--scale", "inf", "--out", "{C}/d"], "--scale", {}),
    ("demo-scale-huge", ["demo", "--scale", "1e39", "--out", "{C}/d"], "--scale: must be a finite number in (0, 1e+06]", {}),
    ("rtol-nan", ["nullspace", "--model", "digits_vit", "--rtol", "nan"], "--rtol", {}),
    ("rtol-one", ["nullspace", "--model", "digits_vit", "--rtol", "1"], "--rtol: must be a finite number in [0, 1)",
     {}),  # rtol 0 is allowed, as nullspace_basis allows it (rank of every nonzero singular value)
    ("iters-0", ["watermark", "--image", "skimage:coffee", "--iters", "0"], "--iters: must be >= 1", {}),
    ("iters-neg", ["targeted", "--source", "skimage:coffee", "--target", "skimage:cat", "--iters", "-5"], "--iters", {}),
    ("strength-nan", ["watermark", "--image", "skimage:coffee", "--strength", "nan"], "--strength", {}),
    ("fp-n-0", ["fingerprint", "make", "--n", "0", "--fingerprint", "{C}/fp.safetensors"], "--n: must be >= 1", {}),
    ("fp-scale-0", ["fingerprint", "make", "--scale", "0"], "--scale", {}),
    # the owner scored NaN against its own fingerprint at 1e30, and make wrote it with rc 0
    ("fp-scale-tiny", ["fingerprint", "make", "--scale", "1e-9", "--n", "4", "--fingerprint", "{C}/fp.safetensors",
                       "--report", "{C}/r"], "scale 1e-09 is too small to move float32 pixels", {}),
    ("fp-scale-huge", ["fingerprint", "make", "--scale", "1e30"], "--scale: must be a finite number in (0, 1000]", {}),
    # an option of the other action was ignored: make --threshold 0.9 stored 0.25
    ("fp-make-threshold", ["fingerprint", "make", "--threshold", "0.9", "--fingerprint", "{C}/fpt.safetensors"],
     "fingerprint make takes no --threshold (it serves fingerprint verify)", {}),
    ("fp-verify-seed", ["fingerprint", "verify", "--seed", "3"], "fingerprint verify takes no --seed", {}),
    ("fp-threshold-nan", ["fingerprint", "verify", "--threshold", "nan"], "--threshold", {}),
    ("fp-threshold-2", ["fingerprint", "verify", "--threshold", "2"], "--threshold", {}),
    ("synth-eps-nan", ["synth", "--eps", "nan"], "--eps", {}),
    ("synth-noises-0", ["synth", "--num-noises", "0"], "--num-noises", {}),
    ("synth-heldout-neg", ["synth", "--heldout", "-1"], "--heldout", {}),
    ("profile-steps-0", ["profile", "synth", "--steps", "0"], "--steps", {}),
    # a fixed-step profile has no use for these synth flags: refused, not ignored
    ("profile-eps", ["profile", "synth", "--eps", "0.1"], "unrecognized arguments: --eps", {}),
    ("profile-max-steps", ["profile", "synth", "--max-steps", "5"], "unrecognized arguments: --max-steps", {}),
    ("profile-stop", ["profile", "synth", "--stop", "heldout"], "unrecognized arguments: --stop", {}),
    ("num-classes-0", ["nullspace", "--model", "digits_vit", "--num-classes", "0"], "--num-classes", {}),
    # config overrides and YAML files: typed fields
    ("ovr-rounds-abc", ft("rounds=abc", "--out", "{C}/o"), "rounds must be a whole number", {}),
    ("ovr-rounds-float", ft("rounds=1.7", "--out", "{C}/o"), "rounds must be a whole number, got 1.7", {}),
    ("ovr-batch-expr", ft("batch_size=10**9", "--out", "{C}/o"), "batch_size must be a whole number", {}),
    ("ovr-ema-abc", FT + ["ema=abc", "--out", "{C}/o"], "ema must be a number", {}),
    ("ovr-ema-1", FT + ["ema=1.5", "--out", "{C}/o"], "ema must be in [0, 1)", {}),
    ("ovr-synth-5", FT + ["synth=5", "--out", "{C}/o"], "must be a mapping", {}),
    ("ovr-wd-neg", FT + ["weight_decay=-5", "--out", "{C}/o"], "weight_decay must be", {}),
    ("ovr-pgd-steps-0", FT + ["pgd.steps=0", "--out", "{C}/o"], "pgd.steps must be", {}),
    ("ovr-old-flat-key", FT + ["pgd_steps=3", "--out", "{C}/o"], "use pgd.steps", {}),
    ("ovr-noise-bank-0", FT + ["noise_bank=0", "--out", "{C}/o"], "noise_bank must be >= 1", {}),
    ("ovr-noise-bank-fresh", FT + ["noise_bank=2", "--out", "{C}/o"], "needs noise_init warm_boundary", {}),
    # a folder's carve error came after the starting model's validation pass and named no key
    ("ovr-heldout-0-boundary", FT[:-1] + ["synth.schedule=boundary", "synth.heldout=0", "--out", "{C}/o"],
     "synth.heldout 0 leaves synth.schedule=boundary no held-out images", {}),
    ("ovr-ckpt-every-neg", FT + ["checkpoint_every=-1", "--out", "{C}/o"], "checkpoint_every must be >= 0", {}),
    ("ovr-lr-nan", FT + ["lr=.nan", "--out", "{C}/o"], "lr must be a finite number", {}),
    ("ovr-synth-eps-inf", FT + ["synth.eps=.inf", "--out", "{C}/o"], "synth.eps must be a finite number", {}),
    ("ovr-bool-int", FT + ["tensorboard=3", "--out", "{C}/o"], "tensorboard must be true or false", {}),
    ("ovr-int-bool", ft("rounds=true", "--out", "{C}/o"), "rounds must be a whole number", {}),
    ("ovr-method-int", ft("method=5", "--out", "{C}/o"), "method must be a string", {}),
    ("ovr-max-images-0", ft("max_images=0", "--out", "{C}/o"), "max_images must be >= 1", {}),
    ("ovr-out-int", FT + ["out=5"], "out must be a string", {}),
    ("ovr-bad-yaml", ft("rounds=[1", "--out", "{C}/o"), "not valid YAML", {}),
    ("ovr-bad-image-mode", FT + ["on_bad_image=ignore", "--out", "{C}/o"], "on_bad_image must be", {}),
    ("yaml-anchor", ["finetune", "--config", "{A}/anchors.yaml", "--out", "{C}/o"], "rounds must be a whole number", {}),
    ("yaml-list", ["finetune", "--config", "{A}/list.yaml", "--out", "{C}/o"], "must hold a mapping", {}),
    ("yaml-broken", ["finetune", "--config", "{A}/bad.yaml", "--out", "{C}/o"], "not valid YAML", {}),
    ("yaml-types", ["finetune", "--config", "{A}/types.yaml"], "out must be a string", {}),
    ("yaml-latin1", ["finetune", "--config", "{A}/latin1.yaml", "--out", "{C}/o"], "not a UTF-8 text file", {}),
    ("yaml-is-checkpoint", ["finetune", "--config", "{A}/nan.safetensors", "--out", "{C}/o"], "not a UTF-8", {}),
    ("seed-huge", SY + ["--seed", "18446744073709551616", "--out", "{C}/b.safetensors"], "--seed: must be <= 4294967295",
     {}),
    ("seeds-huge", ["eval", "--seeds", "0,4294967296"], "must be <= 4294967295", {}),
    ("ovr-seed-huge", FT + ["seed=18446744073709551616", "--out", "{C}/o"], "seed must be <= 4294967295", {}),
    # output paths
    ("out-jpg", ["watermark", "--image", "skimage:coffee", "--out", "{C}/x.jpg"], "must end in .png", {}),
    ("out-is-dir", ["watermark", "--image", "skimage:coffee", "--out", "{A}/adir.safetensors"], "must end in .png", {}),
    ("out-png-dir", ["targeted", "--source", "skimage:coffee", "--target", "skimage:cat", "--out", "{C}/d.png"],
     "is a folder", {"mkdir": "d.png"}),
    ("out-under-file", ["watermark", "--image", "skimage:coffee", "--out", "{A}/afile/x.png"], "is a file", {}),
    ("out-dir-is-file", EV + ["--out", "{A}/afile"], "is a file, not a folder", {}),
    ("out-readonly", SY + ["--out", "/sys/nsvit/b.safetensors"], "cannot write", {}),
    ("out-dangling-link", EV + ["--out", "{C}/gone/report"], "is a link to a missing path",
     {"link": ("gone", "nowhere")}),
    ("synth-out-dangling-link", SY + ["--out", "{C}/gone/b.safetensors"], "is a link to a missing path",
     {"link": ("gone", "nowhere")}),
    ("trace-under-file", ["profile", "synth", "--trace", "{A}/afile/t.json"], "is a file", {}),
    ("trace-suffix", ["profile", "synth", "--trace", "{C}/t.png"], "must end in .json", {}),
    # schedule boundary stops on held-out images: an explicit --stop batch was overridden without a word
    ("synth-boundary-stop-batch", SY + ["--schedule", "boundary", "--stop", "batch", "--out", "{C}/b.safetensors"],
     "--stop batch: --schedule boundary stops its descent on held-out images", {}),
    ("synth-boundary-3-images", ["synth", "--max-images", "3", "--max-steps", "1", "--schedule", "boundary", "--quiet",
                                 "--out", "{C}/b.safetensors"],
     "schedule=boundary (its descent stops on held-out images) measures on held-out images", {}),
    ("synth-out-suffix", SY + ["--out", "{C}/bank.npz"], "must end in .safetensors", {}),
    ("log-under-file", SY + ["--out", "{C}/b.safetensors", "--log", "{A}/afile/l.jsonl"], "is a file", {}),
    ("ft-out-file", FT + ["--out", "{A}/afile"], "is a file, not a folder", {}),
    ("report-under-file", ["fingerprint", "verify", "--fingerprint", "{A}/fp.safetensors", "--report",
                           "{A}/afile/r"], "is a file", {}),
    ("readonly-cwd", EV, "cannot write", {"cwd": "/sys/kernel"}),
    ("full-disk", SY + ["--out", "{C}/b.safetensors"], "cannot write", {"fsize": 4096}),
    # finetune run folders
    ("resume-empty", FT + ["--out", "{C}/empty", "--resume"], "nothing to resume", {"mkdir": "empty"}),
    ("resume-missing", FT + ["--out", "{C}/none", "--resume"], "nothing to resume", {}),
    # checkpoints
    ("ckpt-nan-eval", EV + ["--checkpoint", "{A}/nan.safetensors", "--out", "{C}/ev"], "NaN or inf", {}),
    ("ckpt-inf-eval", EV + ["--checkpoint", "{A}/inf.safetensors", "--out", "{C}/ev"], "NaN or inf", {}),
    ("ckpt-nan-nullspace", ["nullspace", "--checkpoint", "{A}/nan.safetensors"], "NaN or inf", {}),
    ("ckpt-nan-compare", EV + ["--compare", "{A}/nan.safetensors", "--out", "{C}/ev"], "NaN or inf", {}),
    ("ckpt-nan-finetune", FT + ["--checkpoint", "{A}/nan.safetensors", "--out", "{C}/o"], "NaN or inf", {}),
    ("ckpt-wrong-arch", EV + ["--model", "digits_vit", "--checkpoint", "{A}/wrongarch.safetensors", "--out", "{C}/ev"], "not a digits_vit", {}),
    ("ckpt-bad-json", EV + ["--checkpoint", "{A}/badjson.safetensors", "--out", "{C}/ev"], "not valid JSON", {}),
    ("ckpt-missing-key", EV + ["--checkpoint", "{A}/nokeys.safetensors", "--out", "{C}/ev"], "missing 1 key", {}),
    ("ckpt-truncated", EV + ["--checkpoint", "{A}/truncated.safetensors", "--out", "{C}/ev"], "not a readable", {}),
    ("ckpt-random", EV + ["--checkpoint", "{A}/random.safetensors", "--out", "{C}/ev"], "not a readable", {}),
    ("ckpt-float8", ["nullspace", "--checkpoint", "{A}/f8.safetensors"], "is float8_e4m3fn; weights must be", {}),
    ("ckpt-std-tiny", EV + ["--checkpoint", "{A}/std_tiny.safetensors", "--out", "{C}/ev"], "metadata 'std' must be",
     {}),
    ("ckpt-mean-huge", EV + ["--checkpoint", "{A}/mean_huge.safetensors", "--out", "{C}/ev"],
     "metadata 'mean' must be", {}),
    ("ckpt-pickle", ["nullspace", "--model", "digits_vit", "--checkpoint", "{A}/evil.pt"], "pickled Python objects", {}),
    ("ckpt-is-json", ["nullspace", "--model", "digits_vit", "--checkpoint", "{A}/anchors.yaml"],
     "neither safetensors (.safetensors) nor a torch file", {}),
    ("ckpt-dir", ["nullspace", "--model", "digits_vit", "--checkpoint", "{A}/adir.safetensors"], "is a folder, not a file",
     {}),
    ("names-too-many", EV + ["--names", "a,b,c", "--out", "{C}/ev"], "3 names for 1 model", {}),
    ("names-dup", EV + ["--compare", "{A}/wrongarch.safetensors", "--names", "a,a", "--out", "{C}/ev"],
     "share the row name", {}),
    # noise banks
    ("bank-nan", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_nan.safetensors", "--out", "{C}/ev"],
     "NaN or inf", {}),
    ("bank-inf", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_inf.safetensors", "--out", "{C}/ev"],
     "NaN or inf", {}),
    ("bank-missing", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_missing.safetensors", "--out",
                               "{C}/ev"], "lacks tensor 'norm'", {}),
    ("bank-f8", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_f8.safetensors", "--out", "{C}/ev"],
     "noises are float8_e4m3fn, not float32", {}),
    ("bank-int", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_int.safetensors", "--out", "{C}/ev"],
     "noises are int64, not float32", {}),
    ("bank-bool", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_bool.safetensors", "--out", "{C}/ev"],
     "noises are bool, not float32", {}),
    ("bank-norm-edited", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_norm.safetensors", "--out",
                                   "{C}/ev"], "but the bank records", {}),
    ("bank-overflows", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_huge.safetensors", "--out",
                                 "{C}/ev"], "overflows digits_vit's forward", {}),
    ("bank-eps-text", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_eps_text.safetensors", "--out",
                                "{C}/ev"], "metadata eps must be a number in (0, 2)", {}),
    ("bank-without-suite", EV + ["--bank", "{A}/bank.safetensors", "--out", "{C}/ev"],
     "--bank is read by the noisebank suite only", {}),
    # synth wrote a bank of norm-0 noise that its own loader then called corrupt
    ("synth-lim-tiny", SY + ["--lim", "1e-15", "--out", "{C}/b.safetensors"], "below 1e-12: it moves nothing", {}),
    ("bank-zero", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_zero.safetensors", "--out", "{C}/ev"],
     "a zero noise tests nothing", {}),
    ("bank-no-fingerprint", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_nofp.safetensors", "--out",
                                      "{C}/ev"], "metadata 'model_fingerprint' must name the model", {}),
    ("bank-token-shape-meta", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_shape_meta.safetensors",
                                        "--out", "{C}/ev"], "metadata token_shape [17, 96] is not the noises'", {}),
    ("bank-converged-half", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_conv_half.safetensors",
                                      "--out", "{C}/ev"], "converged must be 0/1", {}),
    ("bank-steps-negative", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_steps_neg.safetensors",
                                      "--out", "{C}/ev"], "steps must be whole counts", {}),
    ("bank-match-5", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/bank_match_5.safetensors", "--out",
                               "{C}/ev"], "match_rate must lie in [0, 1]", {}),
    ("bank-wrong-tokens", EV[:2] + ["clean;noisebank", "--max-images", "8", "--bank", "{A}/bank_n17.safetensors",
                                    "--out", "{C}/ev"], "bank_n17.safetensors: noises of shape (17, 96) do not fit", {}),
    ("bank-is-fp", EV[:2] + ["noisebank", "--max-images", "8", "--bank", "{A}/fp.safetensors", "--out", "{C}/ev"],
     "not a noise bank", {}),
    # fingerprints: an edited file must not verify anything
    # a suspect whose output ignores its input moved under neither noise: 0 / 0 scored 0, VERIFIED
    ("fp-zero-head", ["fingerprint", "verify", "--fingerprint", "{A}/fp.safetensors", "--checkpoint",
                      "{A}/zerohead.safetensors", "--report", "{C}/r"], "does not respond to its input", {}),
    ("fp-zero-noise", ["fingerprint", "verify", "--fingerprint", "{A}/fp_zero.safetensors", "--report", "{C}/r"],
     "noise 0 has norm 0", {}),
    ("fp-zero-resigned", ["fingerprint", "verify", "--fingerprint", "{A}/fp_zero_resigned.safetensors", "--report",
                          "{C}/r"], "noise 0 has norm 0", {}),
    ("fp-tiny-resigned", ["fingerprint", "verify", "--fingerprint", "{A}/fp_tiny_resigned.safetensors", "--report",
                          "{C}/r"], "zeroed or rescaled", {}),
    ("fp-bigscale-resigned", ["fingerprint", "verify", "--fingerprint", "{A}/fp_bigscale_resigned.safetensors",
                              "--report", "{C}/r"], "scale must be a finite number in (0, 1000], got 1e+308", {}),
    ("fp-n-resigned", ["fingerprint", "verify", "--fingerprint", "{A}/fp_n_resigned.safetensors", "--report", "{C}/r"],
     "n is 9 but the file holds 8 challenges", {}),
    ("fp-size-resigned", ["fingerprint", "verify", "--fingerprint", "{A}/fp_size_resigned.safetensors", "--report",
                          "{C}/r"], "input_size is [3, 224, 224] but the challenges are [3, 32, 32]", {}),
    ("fp-thr-nan", ["fingerprint", "verify", "--fingerprint", "{A}/fp_thr_nan.safetensors", "--report", "{C}/r"],
     "threshold must be a finite number", {}),
    ("fp-thr-abc", ["fingerprint", "verify", "--fingerprint", "{A}/fp_thr_abc.safetensors", "--report", "{C}/r"],
     "threshold must be", {}),
    ("fp-thr-big", ["fingerprint", "verify", "--fingerprint", "{A}/fp_thr_big.safetensors", "--report", "{C}/r"],
     "threshold must be", {}),
    ("fp-no-control", ["fingerprint", "verify", "--fingerprint", "{A}/fp_nocontrol.safetensors", "--report",
                       "{C}/r"], "lacks tensor 'control'", {}),
    ("fp-no-digest", ["fingerprint", "verify", "--fingerprint", "{A}/fp_nodigest.safetensors", "--report", "{C}/r"],
     "no integrity digest", {}),
    ("fp-edited-images", ["fingerprint", "verify", "--fingerprint", "{A}/fp_images.safetensors", "--report", "{C}/r"],
     "do not match the stored digest", {}),
    ("fp-nan-noise", ["fingerprint", "verify", "--fingerprint", "{A}/fp_nan_noise.safetensors", "--report", "{C}/r"],
     "NaN or inf", {}),
    ("fp-expect-digest", ["fingerprint", "verify", "--fingerprint", "{A}/fp.safetensors", "--expect-digest", "0" * 64,
                          "--report", "{C}/r"], "not the expected", {}),
    ("fp-expect-digest-short", ["fingerprint", "verify", "--fingerprint", "{A}/fp.safetensors", "--expect-digest",
                                "00ff", "--report", "{C}/r"], "--expect-digest: must be the 64-hex-digit", {}),
    ("fp-expect-digest-empty", ["fingerprint", "verify", "--fingerprint", "{A}/fp.safetensors", "--expect-digest", "",
                                "--report", "{C}/r"], "--expect-digest: must be the 64-hex-digit", {}),
    ("fp-f8", ["fingerprint", "verify", "--fingerprint", "{A}/fp_f8.safetensors", "--report", "{C}/r"],
     "images must be float32, got float8_e4m3fn", {}),
    ("fp-f16-resigned", ["fingerprint", "verify", "--fingerprint", "{A}/fp_f16_resigned.safetensors", "--report",
                         "{C}/r"], "images must be float32, got float16", {}),
    ("fp-make-over-checkpoint", ["fingerprint", "make", "--n", "2", "--checkpoint", "{A}/saved.safetensors",
                                 "--fingerprint", "{A}/saved.safetensors", "--report", "{C}/r"],
     "is also --checkpoint: writing it would destroy that input", {}),
    # outputs that are inputs, or each other
    ("synth-log-is-checkpoint", SY + ["--checkpoint", "{A}/saved.safetensors", "--out", "{C}/b.safetensors", "--log",
                                      "{A}/saved.safetensors"], "is also --checkpoint", {}),
    ("synth-out-is-log", SY + ["--out", "{C}/b.safetensors", "--log", "{C}/b.safetensors"], "are one file", {}),
    ("synth-diverged-no-log", SY + ["--lim", "1e20", "--out", "{C}/b.safetensors", "--log", "{C}/s.jsonl"],
     "diverged", {}),  # the folder unchanged: no half-written log either
    ("watermark-over-image", ["watermark", "--image", "{A}/good/0/0.png", "--out", "{A}/good/0/0.png"],
     "is also --image", {}),
    ("watermark-json-over-mark", ["watermark", "--image", "{A}/good/0/0.png", "--mark", "{C}/m.json", "--out",
                                  "{C}/m.png"], "the .json beside --out", {"file": "m.json"}),
    ("targeted-over-target", ["targeted", "--source", "skimage:coffee", "--target", "{A}/good/0/1.png", "--out",
                              "{A}/good/0/1.png"], "is also --target", {}),
    # architecture records
    ("ckpt-mean-edited", EV + ["--checkpoint", "{A}/mean_edit.safetensors", "--out", "{C}/ev"],
     "record_digest differs", {}),  # plausible values, but not the ones the weights were trained with
    ("ckpt-kwargs-edited-undigested", EV + ["--model", "digits_vit", "--checkpoint", "{A}/pool_edit_undigested.safetensors", "--out", "{C}/ev"],
     "not a digits_vit", {}),
    ("ckpt-no-pool-undigested", EV + ["--model", "vit_tiny_patch16_224", "--checkpoint",
                                      "{A}/nopool_undigested.safetensors", "--out", "{C}/ev"],
     "must end in a classifier", {}),  # logits per token: every metric would be wrong, then a traceback
    # held-out measurements with nothing to hold out
    ("fig3-three-images", ["analyze", "fig3", "--max-images", "3", "--steps", "1", "--lams", "0", "--out", "{C}/o"],
     "3 image(s) leave none", {}),
    ("synth-heldout-three-images", ["synth", "--stop", "heldout", "--max-images", "3", "--max-steps", "2", "--quiet",
                                    "--out", "{C}/b.safetensors"], "3 image(s) leave none", {}),
    # run folders
    ("finetune-over-finished-run", FT + ["--out", "{C}/run"], "holds another run's model.safetensors",
     {"file": "run/model.safetensors"}),
    ("eval-into-finetune-run", EV + ["--out", "{C}/run"], "holds a finetuning run (config.json)",
     {"file": "run/config.json"}),
    # files of the same names that are not ours: eval replaced a user's report.md (and deleted a
    # corruptions.png), finetune a fig4_trend.png; analyze trend, demo and watermark wrote over a run's figure
    ("eval-over-user-report", EV + ["--out", "{C}/mine"], "holds report.md but no nsvit-fast report.json",
     {"file": "mine/report.md"}),
    ("finetune-over-user-figure", FT + ["--out", "{C}/mine"], "holds a fig4_trend.png that is not this run's",
     {"file": "mine/fig4_trend.png"}),
    ("trend-into-another-run", ["analyze", "trend", "--run", "{C}/x", "--out", "{C}/run"],
     "holds a finetuning run (log.jsonl)", {"file": "run/log.jsonl"}),
    ("demo-into-a-run", ["demo", "--quick", "--out", "{C}/run"], "holds a finetuning run (log.jsonl)",
     {"file": "run/log.jsonl"}),
    # analyze fig3 / fig5, fingerprint --report, watermark and targeted wrote their files into a run's folder
    ("eval-folder-for-clean", EV[:3] + ["--folder", "clean={A}/good", "--out", "{C}/o"], "suite 'clean' reads no folder",
     {}),  # a folder for a listed suite that reads none was ignored
    ("fig5-into-a-run", ["analyze", "fig5", "--m", "2", "--pairs", "1", "--out", "{C}/run"],
     "holds a finetuning run (log.jsonl)", {"file": "run/log.jsonl"}),
    ("fig3-into-a-run", ["analyze", "fig3", "--steps", "1", "--lams", "1", "--out", "{C}/run"],
     "holds a finetuning run (log.jsonl)", {"file": "run/log.jsonl"}),
    ("fingerprint-report-into-a-run", ["fingerprint", "make", "--n", "2", "--fingerprint", "{C}/fp.safetensors",
                                       "--report", "{C}/run"], "holds a finetuning run (log.jsonl)",
     {"file": "run/log.jsonl"}),
    ("watermark-into-a-run", ["watermark", "--image", "skimage:coffee", "--out", "{C}/run/wm.png"],
     "error: --out's folder ", {"file": "run/log.jsonl"}),
    ("targeted-into-a-run", ["targeted", "--source", "skimage:coffee", "--target", "skimage:astronaut", "--out",
                             "{C}/run/t.png"], "holds a finetuning run (log.jsonl)", {"file": "run/log.jsonl"}),
    ("watermark-over-run-figure", ["watermark", "--image", "skimage:coffee", "--out", "{C}/run/fig4_trend.png"],
     "is a file of the finetuning run", {"file": "run/log.jsonl"}),
    ("log-over-eval-report", SY + ["--out", "{C}/b.safetensors", "--log", "{C}/ev/report.csv"],
     "is a file of the evaluation report", {"file": "ev/report.json"}),
    # a name too long for its temporary sibling failed at the write, after the synthesis
    ("synth-out-name-too-long", SY + ["--out", "{C}/" + "a" * 240 + ".safetensors"], "file name too long", {}),
    ("fp-is-bank", ["fingerprint", "verify", "--fingerprint", "{A}/bank.safetensors", "--report", "{C}/r"],
     "not a fingerprint", {}),
    ("fp-make-out-suffix", ["fingerprint", "make", "--fingerprint", "{C}/fp.json", "--report", "{C}/r"],
     "must end in .safetensors", {}),
    # data folders and images
    ("data-corrupt-synth", SY + ["--data", "{A}/corrupt", "--out", "{C}/b.safetensors"], "9.jpg is not a readable image",
     {}),
    # a reading bar on stderr (not a terminal) put two more lines before the error
    ("data-corrupt-read-bar", ["synth", "--max-images", "300", "--max-steps", "1", "--batch-size", "16", "--quiet",
                               "--data", "{A}/big_corrupt", "--out", "{C}/b.safetensors"],
     "zz.jpg is not a readable image", {}),
    ("data-corrupt-read-bar-profile", ["profile", "synth", "--max-images", "300", "--steps", "1", "--data",
                                       "{A}/big_corrupt", "--trace", "{C}/t.json"], "zz.jpg is not a readable image", {}),
    ("data-corrupt-eval", EV + ["--data", "{A}/corrupt", "--out", "{C}/ev"], "9.jpg is not a readable image", {}),
    ("data-symlink-loop", EV + ["--data", "{A}/loop", "--out", "{C}/ev"], "symlink loop", {}),
    ("data-bomb", EV + ["--data", "{A}/bomb", "--out", "{C}/ev"], "decompression bomb", {}),
    ("image-bomb", ["watermark", "--image", "{A}/bomb.png", "--out", "{C}/w.png"], "decompression bomb", {}),
    ("image-not-image", ["watermark", "--image", "{A}/afile", "--out", "{C}/w.png"], "not a readable image", {}),
    ("data-no-images", EV + ["--data", "{A}/empty_classes", "--out", "{C}/ev"], "", {}),
    ("trend-truncated-log", ["analyze", "trend", "--run", "{A}/run_badlog", "--out", "{C}/an"], "line 2", {}),
    ("trend-log-list", ["analyze", "trend", "--run", "{A}/run_list", "--out", "{C}/an"], "must be a JSON object", {}),
    ("trend-log-nothing-to-plot", ["analyze", "trend", "--run", "{A}/run_bare", "--out", "{C}/an"],
     "no round records a value to plot", {}),  # an empty figure and exit 0
    ("trend-stray-img-size", ["analyze", "trend", "--run", "{A}/run_bare", "--img-size", "64"],
     "analyze trend takes no --img-size", {}),  # was ignored without a word
    ("trend-log-noround", ["analyze", "trend", "--run", "{A}/run_noround", "--out", "{C}/an"], "'round' must be", {}),
    ("trend-log-wordround", ["analyze", "trend", "--run", "{A}/run_wordround", "--out", "{C}/an"], "'round' must be",
     {}),
    ("trend-log-wordnorm", ["analyze", "trend", "--run", "{A}/run_wordnorm", "--out", "{C}/an"],
     "'noise_norm' must be a number", {}),
    ("trend-log-latin1", ["analyze", "trend", "--run", "{A}/run_latin1", "--out", "{C}/an"], "not UTF-8", {}),
    ("data-corrupt-workers", EV + ["--data", "{A}/corrupt", "--workers", "2", "--out", "{C}/ev"],
     "9.jpg is not a readable image", {}),
    ("ood-corrupt", EV[:1] + ["--suite", "imagenet-v2", "--folder", "imagenet-v2={A}/ood_corrupt", "--classes",
                              "a,b,c,d,e,f,g,h,i,j", "--max-images", "8", "--quiet", "--out", "{C}/ev"],
     "9.jpg is not a readable image", {}),
    ("ood-symlink-loop", EV[:1] + ["--suite", "clean;imagenet-sketch", "--folder", "imagenet-sketch={A}/loop",
                                   "--max-images", "8", "--quiet", "--out", "{C}/ev"], "symlink loop", {}),
    # a loop in a folder suite's folder was followed: one class read over and over, a wrong score, exit 0
    ("eval-over-edited-report", EV + ["--out", "{C}/ev"], "record 0 must be an object with the keys",
     {"file": "ev/report.json", "text": '{"kind": "nsvit-fast/report", "records": [{"model": "a", "seed": 0}]}'}),
    ("eval-classes-reordered", EV + ["--classes", "9,8,7,6,5,4,3,2,1,0", "--out", "{C}/ev"],
     "own class names (0, 1, 2, 3, ...) in another order", {}),  # scored 0% with exit 0
    ("ood-classes-count", EV[:1] + ["--suite", "imagenet-v2", "--folder", "imagenet-v2={A}/good", "--classes",
                                    "a,b", "--out", "{C}/ev"], "2 names (2 distinct", {}),
    ("ood-classes-dup", EV[:1] + ["--suite", "imagenet-v2", "--folder", "imagenet-v2={A}/good", "--classes",
                                  "a,b,c,d,e,f,g,h,i,a", "--out", "{C}/ev"], "10 names (9 distinct", {}),
    # environment
    ("compile-no-cxx", FT + ["--compile", "--device", "cpu", "--out", "{C}/o"], "needs a working C++ compiler",
     {"env": {"PATH": "/nonexistent", "CXX": "no-such-cxx"}}),  # inductor: $CXX, else g++ on PATH
    ("env-world-size", FT + ["--out", "{C}/o"], "WORLD_SIZE", {"env": {"WORLD_SIZE": "two"}}),
    ("env-rank-outside", FT + ["--out", "{C}/o"], "RANK=5 is outside [0, WORLD_SIZE=2)",  # waited 30 min for rank 5
     {"env": {"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}}),
    ("env-world-size-neg", FT + ["--out", "{C}/o"], "WORLD_SIZE=-3 must be >= 1", {"env": {"WORLD_SIZE": "-3"}}),
    ("synth-over-a-run", ["synth", "--max-steps", "1", "--out", "{A}/demo_seed0/finetune/ns/checkpoint.safetensors"],
     "is a file of the finetuning run", {}),
    ("pretrain-over-a-run", ["pretrain", "--epochs", "1", "--out", "{A}/demo_seed0/finetune/ns/model.safetensors"],
     "is a file of the finetuning run", {}),
    ("eval-under-torchrun", ["eval", "--suite", "clean", "--out", "{C}/ev"], "only finetune runs under torchrun",
     {"env": {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}}),
    ("synth-under-torchrun", ["synth", "--max-steps", "1"], "synth runs in one process",
     {"env": {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}}),
    ("profile-under-torchrun", ["profile", "synth", "--steps", "1"], "error: profile runs in one process",
     {"env": {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}}),  # "bda>"
    ("profile-diverged", ["profile", "synth", "--steps", "2", "--lim", "1e30", "--trace", "{C}/t.json"],
     "diverged to NaN/inf", {}),  # profiled NaN arithmetic, exit 0
    ("synth-reference-stream", ["synth", "--data", "{A}/good", "--mode", "reference", "--max-steps", "1", "--quiet",
                                "--out", "{C}/b.safetensors"], "--mode reference runs the official loop over images "
                                                               "in memory: add --max-images N", {}),
    ("synth-augment-in-memory", SY + ["--augment", "none", "--out", "{C}/b.safetensors"],
     "--augment applies to a streamed folder", {}),  # ignored: the bank was the one made without it
    ("synth-workers-cut-folder", SY + ["--data", "{A}/good", "--workers", "7", "--out", "{C}/b.safetensors"],
     "--workers applies to a streamed folder", {}),
    ("synth-log-over-demo-report", SY + ["--out", "{C}/b.safetensors", "--log", "{C}/demo/report.md"],
     "is a file of the demo in", {"file": "demo/demo.json"}),
    ("demo-over-foreign-eval", ["demo", "--quick", "--out", "{C}/d"], "holds report.md but no nsvit-fast report.json",
     {"file": "d/eval/report.md"}),  # refused after the whole demo had run and rewritten its figures
    ("demo-into-eval-report", ["demo", "--quick", "--out", "{C}/ev"], "holds an evaluation report (report.json)",
     {"file": "ev/report.json", "text": '{"kind": "nsvit-fast/report", "records": []}'}),  # its report.md replaced
    ("demo-scale-underflow", ["demo", "--quick", "--scale", "1e-12", "--out", "{C}/d"], "too small for float32",
     {}),  # "predictions unchanged 100%" of a noise that changed no pixel
    ("out-empty", FT + ["--out", ""], "--out is empty", {}),
    ("override-after-options", FT + ["--out", "{C}/o", "--quiet", "bogus_key=1"], "unknown finetune key 'bogus_key'",
     {}),  # read as an override (it was "unrecognized arguments"), so checked as one
    ("device-empty", ["eval", "--suite", "clean", "--device", " ", "--out", "{C}/ev"], "--device is empty", {}),
    ("env-master-port", FT + ["--out", "{C}/o"], "MASTER_PORT=99999 must be a port",
     {"env": {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}}),
    # torch would retry the name for 30 minutes ("invalid." never resolves: RFC 6761)
    ("env-master-addr", FT + ["--out", "{C}/o"], "MASTER_ADDR=no.such.host.invalid. does not resolve",  # the dot: no search domain (wildcard DNS)
     {"env": {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "no.such.host.invalid.", "MASTER_PORT": "29599"}}),
    ("env-join-timeout", FT + ["--out", "{C}/o"], "NSVIT_JOIN_TIMEOUT=0 must be >= 1",  # checked before any wait
     {"env": {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599",
              "NSVIT_JOIN_TIMEOUT": "0"}}),
    ("env-world-size-superscript", FT + ["--out", "{C}/o"], "WORLD_SIZE='²' must be a whole number",
     {"env": {"WORLD_SIZE": "²"}}),
    ("env-local-rank-synth", ["synth", "--device", "cuda", "--max-steps", "1"], "LOCAL_RANK='x' must be a whole",
     {"env": {"LOCAL_RANK": "x"}}),
    ("env-local-rank-eval", ["eval", "--device", "cuda", "--suite", "clean"], "LOCAL_RANK='x' must be a whole",
     {"env": {"LOCAL_RANK": "x"}}),
    # from the data/config review: each ran (or hung, or gave a traceback) before
    ("yaml-duplicate-key", FT + ["--config", "{A}/dup.yaml", "--out", "{C}/o"], "duplicate key 'synth' (line 4)", {}),
    ("yaml-11-int", ["finetune", "--quiet", "--config", "{A}/yaml11int.yaml", "--out", "{C}/o"],
     "model_steps must be a whole number", {}),
    ("ovr-steps-huge", ft("model_steps=99999999999999999999", "--out", "{C}/o"), "model_steps must be <= 2147483647",
     {}),
    ("synth-steps-huge", ["synth", "--max-steps", "99999999999999999999"], "must be <= 2147483647", {}),
    ("ovr-lr-float32", FT + ["lr=1e300", "--out", "{C}/o"], "lr must be <= 3.4e+38 (float32)", {}),
    ("stream-all-bad-skip", ["synth", "--data", "{A}/allbad", "--on-bad-image", "skip", "--max-steps", "1", "--workers",
                             "1", "--out", "{C}/b.safetensors"], "holds no readable images (all 2 skipped", {}),
    ("data-null", FT + ["data=null", "--out", "{C}/o"], "data is null: give the training data", {}),
    ("folder-without-suite", EV + ["--folder", "imagenet-r={A}/good", "--out", "{C}/ev"],
     "no suite 'imagenet-r' in --suite reads it", {}),
    ("stream-stop-heldout", ["synth", "--data", "{A}/good", "--stop", "heldout", "--heldout", "0", "--max-steps", "1",
                             "--quiet", "--out", "{C}/b.safetensors"], "image(s) cannot hold 0 out (at most a quarter", {}),
    ("data-mixed-class-names", EV + ["--data", "{A}/mixed", "--out", "{C}/ev"],
     "class folder 'x' is not one of the model's class names", {}),
    ("demo-report-is-folder", ["demo", "--quick", "--out", "{A}/demo_reportdir"], "report.md is a folder", {}),
    ("env-world-size-by-hand", FT + ["--out", "{C}/o"], "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set",
     {"env": {"WORLD_SIZE": "2"}}),
    # models, names and values a user mistypes, per subcommand
    ("nullspace-resnet", ["nullspace", "--model", "resnet18"], "not a supported family", {}),
    ("nullspace-no-ckpt", ["nullspace", "--model", "vit_tiny_patch16_224", "--checkpoint", "/nonexistent.safetensors"],
     "not found", {}),
    ("nullspace-typo", ["nullspace", "--model", "vit_smal_patch32_224"], "unknown timm model", {}),
    ("nullspace-no-model", ["nullspace"], "give --model", {}),
    ("nullspace-offline", ["nullspace", "--model", "vit_tiny_patch16_224", "--pretrained"], "could not get pretrained",
     {}),  # HF_HOME is an empty folder (_run_batch): weights a runner cached would load
    ("pretrain-epochs-0", ["pretrain", "--epochs", "0"], "--epochs: must be >= 1", {}),
    ("synth-eps-0", ["synth", "--eps", "0", "--out", "{C}/b.safetensors"], "--eps: must be a finite number in (0, 2)",
     {}),
    ("synth-lim-neg", ["synth", "--lim", "-1", "--out", "{C}/b.safetensors"], "--lim: must be a finite number", {}),
    ("synth-no-folder", ["synth", "--data", "/no/such/folder", "--out", "{C}/b.safetensors"], "neither", {}),
    ("ft-method", ["finetune", "method=magic", "--out", "{C}/o"], "unknown method 'magic'", {}),
    ("ft-key-typo", ["finetune", "roundz=3", "--out", "{C}/o"], "did you mean 'rounds'", {}),
    ("ft-synth-key-typo", ["finetune", "synth.epss=0.1", "--out", "{C}/o"], "did you mean 'eps'", {}),
    ("ft-config", ["finetune", "--config", "nope", "--out", "{C}/o"], "config 'nope' not found", {}),
    ("ft-timm-model-without-config", ["finetune", "--model", "vit_tiny_patch16_224", "--out", "{C}/o"],
     "takes a --config: the default one, digits, holds the embedded digits model's settings", {}),
    ("ft-random-weights", ["finetune", "--config", "vit_s_imagenet", "--data", "digits:train", "--out", "{C}/o"],
     "vit_small_patch32_224 would start from random weights", {}),
    ("ft-flag-and-key", ["finetune", "precision=bf16", "--precision", "fp32", "--out", "{C}/o"],
     "precision is given twice, as --precision fp32 and precision=bf16", {}),
    ("ft-pretrained-flag-and-key", ["finetune", "pretrained=false", "--pretrained", "--out", "{C}/o"],
     "pretrained is given twice", {}),
    ("ft-data-flag-and-key", ["finetune", "data=digits:test", "--data", "digits:train", "--out", "{C}/o"],
     "data is given twice", {}),
    ("ft-run-key-typo", ["finetune", "chekpoint=x.safetensors", "--out", "{C}/o"], "did you mean 'checkpoint'?", {}),
    ("ft-config-val-placeholder", ["finetune", "--config", "vit_s_imagenet", "--data", "digits:train", "random_init=true",
                                   "--out", "{C}/o"],
     "val_data: data '/path/to/imagenet/val' is neither digits[:split], synthetic[:split] nor an existing folder (the "
     "config's val_data", {}),
    ("synth-default-data-for-224", ["synth", "--model", "vit_tiny_patch16_224", "--out", "{C}/x.safetensors"],
     "--data defaults to digits (32 x 32 images), which vit_tiny_patch16_224 cannot take (224 x 224)", {}),
    ("ft-no-value", ["finetune", "rounds", "--out", "{C}/o"], "must be key=value", {}),
    ("use-ema-safetensors", ["synth", "--checkpoint", "{A}/nan.safetensors", "--use-ema", "--out", "{C}/b.safetensors"],
     "a safetensors file holds one set of weights", {}),
    ("use-ema-no-checkpoint", ["synth", "--use-ema", "--out", "{C}/b.safetensors"],
     "use_ema reads a checkpoint's EMA weights: give a checkpoint", {}),
    ("ft-random-match", ["finetune", "method=random", "random.match=l2", "--out", "{C}/o"],
     "random.match must be one of eps, norm", {}),
    ("ft-random-norm-without-match", ["finetune", "method=random", "random.norm=3", "--out", "{C}/o"],
     "set a norm-matched control: add random.match=norm", {}),
    ("ft-lr-t-max-short", ["finetune", "lr_t_max=5", "--out", "{C}/o"], "lr_t_max must be 0 (rounds x model_steps)", {}),
    ("ft-lr-t-max-negative", ["finetune", "lr_t_max=-1", "--out", "{C}/o"], "lr_t_max must be", {}),
    ("ft-augment", ["finetune", "augment=torchvision", "--out", "{C}/o"], "augment must be one of rrc_flip, official, none",
     {}),
    # a dry run sets rounds and steps itself: the user's own values are still checked
    ("ft-dry-run-bad-rounds", ["finetune", "--dry-run", "rounds=abc", "--out", "{C}/o"],
     "rounds must be a whole number", {}),
    ("ft-dry-run-bad-steps", ["finetune", "--dry-run", "synth.max_steps=-1", "--out", "{C}/o"],
     "max_steps must be >= 1", {}),
    ("ft-no-folder", ["finetune", "--data", "/no/such/dir", "--out", "{C}/o"], "neither", {}),
    ("eval-suite-typo", EV[:1] + ["--suite", "fgms", "--out", "{C}/ev"], "unknown suite", {}),
    # one run counted twice in the mean ± std: n = 2 from one seed
    ("eval-fgsm-eps-8", EV[:1] + ["--suite", "fgsm:eps=8", "--out", "{C}/ev"], "must be <= 1 (8/255, not 8)", {}),
    ("eval-pgd-eps-8", EV[:1] + ["--suite", "pgd:eps=8", "--out", "{C}/ev"], "must be <= 1 (8/255, not 8)", {}),
    # a folder suite's folder was checked only when its turn came, after the suites before it ran
    ("eval-late-folder", EV[:1] + ["--suite", "clean;imagenet-r", "--folder", "imagenet-r={A}/good/0", "--out", "{C}/ev"],
     "has no class folders", {}),
    ("eval-seeds-twice", EV + ["--seeds", "0,1,0", "--out", "{C}/ev"], "'0' appears twice in '0,1,0'", {}),
    ("eval-suite-twice", EV[:1] + ["--suite", "fgsm;fgsm:eps=1/255", "--out", "{C}/ev"],
     "suite fgsm:eps=1/255 is given twice (as fgsm)", {}),
    # both wrote the baseline's corruption errors to one slot: the last one normalised every mCE
    ("eval-two-c-suites", EV[:1] + ["--suite", "corruptions,imagenet-c", "--folder", "imagenet-c={A}/good",
                                    "--out", "{C}/ev"], "suites corruptions and imagenet-c both fill", {}),
    ("eval-suite-no-folder", EV[:1] + ["--suite", "imagenet-a", "--out", "{C}/ev"], "needs its folder", {}),
    ("eval-folder-missing", EV[:1] + ["--suite", "clean", "--folder", "imagenet-a=/nope", "--suite", "imagenet-a",
                                      "--out", "{C}/ev"], "folder not found", {}),
    ("eval-eps-neg", EV[:1] + ["--suite", "fgsm:eps=-2/255", "--out", "{C}/ev"], "eps must be >= 0", {}),
    ("eval-steps-frac", EV[:1] + ["--suite", "pgd:steps=2.5", "--out", "{C}/ev"], "steps must be a whole number", {}),
    ("eval-steps-neg", EV[:1] + ["--suite", "pgd:steps=-3", "--out", "{C}/ev"], "steps must be a whole number >= 1",
     {}),
    ("eval-cw-steps-0", EV[:1] + ["--suite", "cw:steps=0", "--out", "{C}/ev"], "steps must be a whole number >= 1", {}),
    ("eval-alpha-neg", EV[:1] + ["--suite", "pgd:alpha=-1", "--out", "{C}/ev"], "alpha must be > 0", {}),
    ("eval-eps-huge", EV[:1] + ["--suite", "fgsm:eps=1e400", "--out", "{C}/ev"], "not a finite number", {}),
    ("eval-scale-huge", EV[:1] + ["--suite", "nullspace:scale=1e400", "--out", "{C}/ev"], "not a finite number", {}),
    ("eval-no-suite", EV[:1] + ["--suite", ";", "--out", "{C}/ev"], "names no suite", {}),
    ("eval-report-dir", EV + ["--out", "{C}/ev"], "report.md is a folder", {"mkdir": "ev/report.md"}),
    ("wm-json-dir", ["watermark", "--image", "skimage:coffee", "--out", "{C}/w.png"], "w.json is a folder",
     {"mkdir": "w.json"}),
    ("targeted-figure-dir", ["targeted", "--source", "skimage:coffee", "--target", "skimage:cat", "--out",
                             "{C}/t.png"], "t_figure.png is a folder", {"mkdir": "t_figure.png"}),
    ("fp-make-json-dir", ["fingerprint", "make", "--n", "2", "--fingerprint", "{C}/fp.safetensors", "--report",
                          "{C}/r"], "fingerprint_make.json is a folder", {"mkdir": "r/fingerprint_make.json"}),
    ("synth-eps-2", SY + ["--eps", "2", "--out", "{C}/b.safetensors"], "--eps: must be a finite number in (0, 2)", {}),
    ("ovr-synth-eps-5", FT + ["synth.eps=5", "--out", "{C}/o"], "eps must be < 2", {}),
    ("fig5-m-1", ["analyze", "fig5", "--m", "1"], "--m: must be >= 2", {}),
    ("fig5-nothing-held-out", ["analyze", "fig5", "--m", "2", "--pairs", "1", "--max-images", "3", "--out", "{C}/o"],
     "3 image(s) leave none; give at least 4", {}),
    # overrides: the last of two won, a huge int or an unhashable key was a traceback, an empty value null
    ("ovr-twice", FT + ["rounds=2", "--out", "{C}/o"], "override 'rounds' is given twice", {}),
    ("ovr-block-and-key", FT + ["synth.eps=0.01", "synth={eps: 0.02}", "--out", "{C}/o"],
     "override 'synth' is given twice (also as 'synth.eps')", {}),
    ("ovr-huge-int", FT + ["lr=1" + "0" * 400, "--out", "{C}/o"], "lr is too large, got an integer of 401 digits", {}),
    ("ovr-unhashable-key", FT + ["synth={[1]: 2}", "--out", "{C}/o"], "found unhashable key", {}),
    ("ovr-empty-value", FT + ["out="], "override 'out=' has no value", {}),
    ("ovr-block-null", ["finetune", "--config", "digits", "synth=null", "--out", "{C}/o"],
     "synth=null would drop every synth setting of the config", {}),
    ("ovr-max-images-huge", ["finetune", "--quiet", "max_images=1e20", "--out", "{C}/o"],
     "max_images must be <= 2147483647", {}),
    ("ovr-workers-huge", FT + ["workers=99999999999", "--out", "{C}/o"], "workers must be <= 256", {}),
    ("digits-pretrained", ["nullspace", "--model", "digits_vit", "--pretrained"], "ships its own weights", {}),
    ("fig5-pairs-repeat", ["analyze", "fig5", "--m", "3", "--pairs", "4", "--out", "{C}/o"],  # a pair would repeat
     "n_pairs 4 is more than the 3 distinct pairs of m = 3 noises", {}),
    ("table1-checkpoint", ["nullspace", "--table1", "--checkpoint", "/no/such.pt"], "--table1 takes no --checkpoint",
     {}),
    ("ckpt-int-weights", ["nullspace", "--model", "digits_vit", "--checkpoint", "{A}/intweight.pt"],
     "'head.weight' is int64; weights must be", {}),
    ("ckpt-sparse", ["nullspace", "--model", "digits_vit", "--checkpoint", "{A}/sparse.pt"],
     "not a dense tensor with data", {}),
    ("ckpt-meta", ["nullspace", "--model", "digits_vit", "--checkpoint", "{A}/meta.pt"], "not a dense tensor", {}),
    ("eval-labels-past-outputs", EV + ["--checkpoint", "{A}/five.safetensors", "--out", "{C}/ev"],
     "has 10 classes, the model 5 outputs", {}),
    ("eval-compare-labels", EV + ["--compare", "{A}/five.safetensors", "--out", "{C}/ev"],
     "has 10 classes, the model 5 outputs", {}),
    ("eval-folder-12-classes", EV + ["--data", "{A}/twelve", "--out", "{C}/ev"], "has 12 classes, the model 10", {}),
    ("ft-labels-past-outputs", FT + ["--checkpoint", "{A}/five.safetensors", "--out", "{C}/o"],
     "the training data has 10 classes, the model 5", {}),
    ("ft-val-12-classes", FT[:-2] + ["method=plain", "val_data={A}/twelve", "--out", "{C}/o"],
     "the validation data has 12 classes", {}),
    ("ft-tensorboard-file", FT + ["tensorboard=true", "--out", "{C}/o"], "is a file, where tensorboard=True",
     {"file": "o/tensorboard"}),
    # --mean / --std: the normalisation of pixels in [0, 1] (a 0-255 mean, a zero std, one number short)
    ("mean-0-255", EV + ["--mean", "124", "116", "104", "--out", "{C}/ev"], "mean must be a list of numbers in [-10, 10]",
     {}),
    ("std-zero", EV + ["--std", "0", "--out", "{C}/ev"], "std must be a list of numbers in [0.001, 1000]", {}),
    ("std-two-of-three", EV + ["--std", "0.2", "0.3", "--out", "{C}/ev"], "needs mean/std of 1 or 3 value(s)", {}),
    ("mean-word", EV + ["--mean", "imagenet", "--out", "{C}/ev"], "argument --mean: must be a number", {}),
    ("mean-swallows-a-key", ["finetune", "--mean", "0.5", "rounds=1", "--out", "{C}/o"],
     "got 'rounds=1' (--mean and --std read every word after them: put other arguments before them)", {}),
    ("ft-mean-scalar", ft("mean=0.5", "--out", "{C}/o"), "mean must be a list, got 0.5", {}),
    ("ft-std-string", ft("std=[a, b, c]", "--out", "{C}/o"), "std[0] must be a number", {}),
    # random_init=true with weights given had been ignored (the weights were used); compile=false --compile compiled
    ("ft-random-init-digits", ft("random_init=true", "--out", "{C}/o"), "random_init=true starts from random weights, "
     "but weights are given (digits_vit, which ships its weights)", {}),
    ("ft-random-init-ckpt", ft("random_init=true", "--model", "vit_tiny_patch16_224", "--config", "vit_s_imagenet",
                               "--checkpoint", "{A}/five.safetensors", "--out", "{C}/o"),
     "but weights are given (checkpoint=", {}),
    ("ft-compile-twice", ft("compile=false", "--compile", "--out", "{C}/o"),
     "compile is given twice, as --compile and compile=false", {}),
    ("ft-ckpt-key-needs-config", ft("checkpoint={A}/tiny_other.safetensors", "model=null", "--out", "{C}/o"),
     "tiny_other.safetensors (vit_tiny_patch16_224) takes a --config", {}),
    # an output inside a data folder: its figures became samples of a class, or a class of their own
    ("eval-out-in-data", EV + ["--data", "{A}/good", "--out", "{A}/good/0/ev"], "good/0/ev is inside --data",
     {}),
    ("ft-out-in-data", ft("--data", "{A}/good", "--out", "{A}/good/run"), "is inside --data", {}),
    ("synth-out-in-data", SY + ["--data", "{A}/good", "--out", "{A}/good/0/b.safetensors"], "is inside --data", {}),
    ("fingerprint-report-in-data", ["fingerprint", "make", "--data", "{A}/good", "--report", "{A}/good/fp",
                                    "--fingerprint", "{C}/fp.safetensors"], "good/fp is inside --data", {}),
    ("workers-fork-bomb", EV + ["--workers", "100000", "--out", "{C}/ev"], "argument --workers: must be <= 256", {}),
    ("ft-workers-fork-bomb", ft("workers=100000", "--out", "{C}/o"), "workers must be <= 256", {}),
    ("ft-bank-batch-zero", ft("synth.batch_size=0", "--out", "{C}/o"), "synth: batch_size must be >= 1, got 0", {}),
    # an output that is a symbolic link: the checks were of the link's name, the write of its target's
    ("synth-log-link", SY + ["--log", "{C}/l.jsonl", "--out", "{C}/b.safetensors"], "is a symbolic link",
     {"link": ("l.jsonl", "/nonexistent/x.jsonl")}),
    ("demo-other-seed", ["demo", "--quick", "--seed", "1", "--out", "{A}/demo_seed0"], "belongs to another demo", {}),
    ("synth-noises-huge", SY + ["--num-noises", "1000000000", "--device", "cpu", "--out", "{C}/b.safetensors"],
     "out of memory",
     {"as": 64 << 30}),  # ~6 TB asked: refused under the limit even where the host overcommits
    ("synth-diverges", SY + ["--lim", "1e20", "--out", "{C}/b.safetensors"], "the noise diverged to NaN/inf", {}),
    ("wm-sizes", ["watermark", "--image", "skimage:astronaut", "--mark", "skimage:coffee", "--out", "{C}/o.png"],
     "give images of one size", {}),
    ("eval-bank-as-checkpoint", ["eval", "--checkpoint", "{A}/bank.safetensors", "--suite", "clean", "--out", "{C}/r"],
     "is a noise bank (synth's output), not model weights", {}),
    ("wm-no-image", ["watermark", "--image", "/no/such.png", "--out", "{C}/o.png"], "image not found", {}),
    ("wm-image-is-a-folder", ["watermark", "--image", "{C}", "--out", "{C}/o2.png"], "is a folder; give one image file", {}),
    ("wm-strength-2", ["watermark", "--image", "skimage:coffee", "--strength", "2", "--out", "{C}/o.png"],
     "--strength: must be a finite number in (0, 1]", {}),
    ("wm-patch8", ["watermark", "--model", "vit_base_patch8_224", "--image", "skimage:coffee", "--out", "{C}/o.png"],
     "no patch-embedding nullspace", {}),
    ("fp-verify-missing", ["fingerprint", "verify", "--fingerprint", "/no/fp.safetensors"], "no such file", {}),
    ("trend-no-run", ["analyze", "trend"], "needs --run", {}),
    ("saliency-unknown", ["targeted", "--source", "skimage:coffee", "--target", "skimage:cat", "--saliency", "lrp"],
     "unknown saliency method", {}),
]
if not torch.cuda.is_available():  # asking for the GPU a machine lacks
    CASES += [(f"no-cuda-{cmd[0]}", [*cmd, "--device", "cuda"],
               "device 'cuda' asked for, but torch sees no CUDA", {})
              for cmd in (["finetune", "--dry-run"], ["synth", "--out", "x.safetensors"], ["eval"])]


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()  # a folder's own mtime may move (a write check); its entries may not
            out[str(p.relative_to(root))] = (st.st_mode,) if p.is_dir() and not p.is_symlink() else \
                (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _run_batch(cases: list[dict], timeout: int = 600) -> list[int]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nsvit-hf-") as hf:  # huggingface_hub reads it at import
        return run_forkrun(cases, "cli", timeout=timeout, env={**ENV, "HF_HOME": hf},
                           cwd=Path(__file__).resolve().parents[1])


def _prepare(cases, assets: Path, root: Path) -> list[dict]:
    out = []
    for cid, argv, _, opt in cases:
        case = root / "cases" / cid
        log = root / "logs" / cid
        case.mkdir(parents=True)
        log.mkdir(parents=True)
        if opt.get("mkdir"):
            (case / opt["mkdir"]).mkdir(parents=True)
        if opt.get("link"):  # a symlink to a path that does not exist
            os.symlink(opt["link"][1], case / opt["link"][0])
        if opt.get("file"):
            (case / opt["file"]).parent.mkdir(parents=True, exist_ok=True)
            (case / opt["file"]).write_text(opt.get("text", "a file\n"))
        sub = [a.replace("{A}", str(assets)).replace("{C}", str(case)) for a in argv]
        out.append({"argv": sub, "cwd": opt.get("cwd", str(case)), "log": str(log), "env": {k: v.replace("{C}", str(case)) for k, v in opt.get("env", {}).items()},
                    "fsize": opt.get("fsize", 0), "as": opt.get("as", 0)})
    return out


def test_every_hostile_case_is_one_line_exit_2_and_touches_nothing(assets, tmp_path):
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    jobs = _prepare(CASES, assets, tmp_path)
    before = {"assets": _snapshot(assets), "cases": _snapshot(tmp_path / "cases")}
    t0 = time.perf_counter()
    codes = _run_batch(jobs)
    seconds = time.perf_counter() - t0
    after = {"assets": _snapshot(assets), "cases": _snapshot(tmp_path / "cases")}
    failures = []
    for (cid, _, msg, _), job, code in zip(CASES, jobs, codes):
        err = (Path(job["log"]) / "err").read_text()
        lines = err.strip().splitlines()
        ok = code == 2 and len(lines) == 1 and lines[0].startswith("nsvit-fast: error: ") and msg in lines[0]
        ok = ok and "Traceback" not in lines[0]  # e.g. a DataLoader worker's, folded into the line
        ok = ok and "weights_only=False" not in err
        if not ok:
            failures.append(f"{cid}: exit {code}, stderr {err[-600:]!r}")
    assert not failures, "\n".join(failures)
    assert before == after, {k: set(before[k].items()) ^ set(after[k].items()) for k in before}
    assert not (assets / "PWNED").exists()  # the pickle's payload never ran
    print(f"{len(CASES)} hostile cases in {seconds:.1f} s")


def test_entry_point_itself(tmp_path):
    # the same promise through `python -m nsvit_fast`, warnings on: no usage block, no warning line
    for args, msg in ((["eval", "--bogus"], "unrecognized arguments"),
                      (["finetune", "rounds=abc", "--out", str(tmp_path / "o")], "rounds must be a whole number")):
        r = subprocess.run([sys.executable, "-m", "nsvit_fast", *args], capture_output=True, text=True, env=ENV,
                           timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_images_skipped_with_a_count(assets, tmp_path):
    # the sane alternative to stopping: on_bad_image skip drops the file and says how many
    jobs = _prepare([("skip", EV + ["--data", str(assets / "corrupt"), "--on-bad-image", "skip", "--out",
                                    "{C}/ev"], "", {})], assets, tmp_path)
    assert _run_batch(jobs) == [0]
    err = (Path(jobs[0]["log"]) / "err").read_text()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsvit-fast: warning: ") and "skipped 1 unreadable image(s)" in err
    assert "9.jpg" in err and (tmp_path / "cases" / "skip" / "ev" / "report.json").is_file()


def test_bad_images_in_an_ood_folder_skipped_with_a_count(assets, tmp_path):
    # the folder suites honour on_bad_image skip too (they stopped at the bad file, advising skip)
    jobs = _prepare([("skip", EV[:1] + ["--suite", "imagenet-v2", "--folder", f"imagenet-v2={assets / 'ood_corrupt'}",
                                        "--classes", "a,b,c,d,e,f,g,h,i,j", "--on-bad-image", "skip", "--quiet",
                                        "--out", "{C}/ev"], "", {})], assets, tmp_path)
    assert _run_batch(jobs) == [0]
    err = (Path(jobs[0]["log"]) / "err").read_text()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "imagenet-v2: skipped 1 unreadable image(s)" in err and "9.jpg" in err
    report = json.loads((tmp_path / "cases" / "skip" / "ev" / "report.json").read_text())
    assert any(r.get("suite") == "imagenet-v2" for r in report["records"])


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "nsvit_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def test_ranks_started_by_hand_give_up_on_the_others_in_one_line(tmp_path):
    # without torchrun, torch's rendezvous waited the process group's 30 minutes for a missing rank
    # (and its client printed C++ frames on every refused connect); NSVIT_JOIN_TIMEOUT bounds it
    import socket

    def alone(rank: int, port: int, wait: int = 2, world: int = 2):
        env = {**ENV, "WORLD_SIZE": str(world), "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NSVIT_JOIN_TIMEOUT": str(wait)}
        return subprocess.Popen([sys.executable, "-m", "nsvit_fast", *FT, "--out",
                                 str(tmp_path / f"o{rank}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)

    try:  # held on IPv4 and IPv6 both: the store may listen on either
        taken = socket.socket(socket.AF_INET6)
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        taken.bind(("::", 0))
    except OSError:
        taken = socket.socket()
        taken.bind(("0.0.0.0", 0))
    with taken:
        taken.listen()
        runs = {"rank 0 alone": (alone(0, free_port()), "rank 0: 1 of 2 ranks joined at 127.0.0.1:"),
                "rank 1 alone": (alone(1, free_port()), "rank 1: rank 0 did not open 127.0.0.1:"),
                "port taken": (alone(0, taken.getsockname()[1]), "is in use on rank 0's machine"),
                # a program on the port that accepts and never answers: torch's client ignored its
                # timeout and waited, deaf to SIGTERM, until that program closed the connection
                "port answers": (alone(1, taken.getsockname()[1]), "rank 1: something answers at 127.0.0.1:")}
        port = free_port()  # a typo in one rank's WORLD_SIZE: both say so at once, not after the wait
        runs["world 2"] = alone(0, port, wait=300), "rank 0: rank 1 was started with WORLD_SIZE=3, rank 0 with 2"
        runs["world 3"] = alone(1, port, wait=300, world=3), "rank 1 was started with WORLD_SIZE=3, rank 0 with 2"
        for what, (p, msg) in runs.items():
            out, err = p.communicate(timeout=120)
            lines = err.strip().splitlines()
            assert p.returncode == 2 and len(lines) == 1 and msg in lines[0], (what, err[-2000:])
            if what in ("rank 0 alone", "rank 1 alone"):
                assert "within 2 s" in lines[0] and "torchrun" in lines[0], lines
    # a RANK outside WORLD_SIZE refuses itself before joining, and tells rank 0, which stops too
    port = free_port()
    first = alone(0, port, wait=300)
    wait_for_port(port, first)
    typo = alone(5, port, wait=300)
    for p, msg in ((typo, "RANK=5 is outside [0, WORLD_SIZE=2)"), (first, "rank 0: RANK=5 is outside [0, WORLD_SIZE=2)")):
        lines = p.communicate(timeout=120)[1].strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and msg in lines[0], lines
    # the wait is in Python: SIGTERM (SLURM's scancel) ends it at once; torch's went on for 30 min
    port = free_port()
    waiting = alone(0, port, wait=300)
    wait_for_port(port, waiting)  # rank 0's port opens when its wait begins
    time.sleep(0.5)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=30) == 143
    assert waiting.stderr.read().strip().splitlines() == ["nsvit-fast: terminated (SIGTERM)"]
    # rank 0 killed while the others wait: torch's C++ store logged ~48 lines of frames before our line
    port = free_port()
    first = alone(0, port, wait=300, world=3)
    wait_for_port(port, first)
    second = alone(1, port, wait=300, world=3)
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
    until = time.monotonic() + 60
    while store.add("nsvit/joined", 0) < 2 and time.monotonic() < until:  # both counted in, both waiting
        time.sleep(0.2)
    del store
    first.kill()
    lines = second.communicate(timeout=120)[1].strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, lines
    assert "rank 1: lost rank 0 at 127.0.0.1:" in lines[0] or "rank 1: rank 0 stopped" in lines[0], lines
    first.communicate(timeout=30)
    assert not any(tmp_path.iterdir())  # refused before --out was made


def test_a_rank_that_fails_after_joining_stops_the_others_in_one_line(tmp_path):
    # rank 1's --out cannot be written (a node-local fault): it says so and leaves; rank 0, waiting in
    # the first collective, got gloo's "Connection closed by peer" as a 30-line traceback
    port = free_port()
    (tmp_path / "a_file").write_text("")
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-m", "nsvit_fast", *FT, "--out", str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r)})
             for r, out in ((0, tmp_path / "o0"), (1, tmp_path / "a_file" / "o1"))]
    errs = [p.communicate(timeout=300)[1].strip().splitlines() for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], errs
    assert len(errs[1]) == 1 and "o1" in errs[1][0], errs[1]
    assert len(errs[0]) == 1 and "rank 0: another rank left the run" in errs[0][0], errs[0]
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_ranks_resuming_from_different_checkpoints_are_refused(tmp_path):
    # each rank restores its own --out: one without the run started afresh while rank 0 resumed, and
    # the two trained on mixed state (or one waited on a collective the other never made)
    assert subprocess.run([sys.executable, "-m", "nsvit_fast", *FT, "--out",
                           str(tmp_path / "o0")], env=ENV, capture_output=True, text=True, timeout=300).returncode == 0
    import shutil

    shutil.copytree(tmp_path / "o0", tmp_path / "o1")  # another node's copy of the run, a step apart
    ck = tmp_path / "o1" / "checkpoint.safetensors"
    from safetensors.torch import load_file

    t = load_file(str(ck))
    key = next(k for k in t if k.endswith("head.bias"))
    _edit_tensors(ck, tmp_path / "edited.safetensors", {key: t[key] + 1e-3})
    os.replace(tmp_path / "edited.safetensors", ck)
    port = free_port()
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-m", "nsvit_fast", *FT, "--resume",
                               "--out", str(tmp_path / f"o{r}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r)}) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=300)[1].strip().splitlines() for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [2, 2], errs
    for lines in errs:
        assert len(lines) == 1 and "different checkpoints to resume from" in lines[0] and "[1]" in lines[0], errs


def test_each_rank_names_itself_in_its_warnings(tmp_path):
    # every rank prints its own warnings (a skipped-image count is its shard's): unnamed, W copies of
    # a line could not be told apart
    (tmp_path / "digits").mkdir()  # warns: the built-in set is read, not this folder
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-m", "nsvit_fast", *FT, "data=digits", "--out", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**env, "RANK": str(r)}) for r in (0, 1)]
    for r, p in enumerate(ranks):
        err = p.communicate(timeout=300)[1].strip().splitlines()
        assert p.returncode == 0 and err == [f"nsvit-fast: warning: rank {r}: data 'digits' is the built-in set; the "
                                             f"folder of that name here is not read (write ./digits for it)"], err
    # one process: no rank named
    one = subprocess.run([sys.executable, "-m", "nsvit_fast", *FT, "data=digits", "--out", str(tmp_path / "one")],
                         cwd=tmp_path,
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0 and one.stderr.startswith("nsvit-fast: warning: data 'digits'"), one.stderr


@pytest.mark.slow  # the first run must outlast the second's start-up (~3 s of CPU): ~20 s of CPU
def test_two_finetunes_on_one_folder_one_is_refused_the_other_intact(tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--quiet", "--out", str(out), "method=plain", "rounds=2", "model_steps=150", "batch_size=32",
            "max_images=256"]
    first = _cli(*args, "seed=1")
    t0 = time.time()
    while not (out / ".nsvit.lock").exists() and first.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()
    second = _cli(*args, "seed=2")
    assert second.wait(timeout=300) == 2
    err = second.stderr.read().strip().splitlines()
    assert first.poll() is None, "the first run ended before the second was refused: not a concurrency test"
    assert len(err) == 1 and "in use by another nsvit-fast run (pid " + str(first.pid) in err[0], err
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert json.loads((out / "config.json").read_text())["seed"] == 1  # one run's files only
    from nsvit_fast.io import load_tensors

    assert load_tensors(out / "checkpoint.safetensors")[1]["config"]["seed"] == 1
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert not (out / ".nsvit.lock").exists()


def test_a_killed_runs_lock_does_not_block(tmp_path):
    from nsvit_fast.runlock import run_lock

    code = f"from nsvit_fast.runlock import run_lock\nimport time\nwith run_lock({str(tmp_path)!r}):\n" \
           f"    print('held', flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    from nsvit_fast import NsvitError

    with pytest.raises(NsvitError, match=f"in use by another nsvit-fast run \\(pid {holder.pid} "):
        with run_lock(tmp_path):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".nsvit.lock").exists()  # the file stays, the lock went with the process
    with run_lock(tmp_path):
        assert str(os.getpid()) in (tmp_path / ".nsvit.lock").read_text()
    assert not (tmp_path / ".nsvit.lock").exists()


@contextlib.contextmanager
def _lock_held_elsewhere(folder, file=None):
    """Another process holds ``folder``'s run lock (or, given ``file``, that output file's lock)
    for the block; yields its pid."""
    lock = f"run_lock({str(folder)!r})" if file is None else f"output_lock({{'--out': {str(file)!r}}})"
    code = f"from nsvit_fast.runlock import output_lock, run_lock\nimport time\nwith {lock}:\n" \
           f"    print('held', flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_eval_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two evaluations on one report folder: the second is refused at once (the run lock), so one
    report is never silently replaced by another's while both print "wrote"."""
    from nsvit_fast.cli import main

    with _lock_held_elsewhere(tmp_path) as pid:
        rc = main(["eval", "--suite", "clean", "--max-images", "8", "--quiet", "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"in use by another nsvit-fast run (pid {pid} " in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == [".nsvit.lock"]  # no report written


@pytest.mark.slow  # one finetune start-up, then SIGTERM once its config.json is written: ~5-10 s of CPU
def test_sigterm_cleans_up_as_sigint(tmp_path):
    # timeout, SLURM and docker stop send SIGTERM: it left the fresh run's config.json (so neither a
    # new run nor --resume was accepted) and temp files; now it takes SIGINT's path, exit 143
    out = tmp_path / "run"
    run = _cli("finetune", "--quiet", "--out", str(out), "method=plain", "rounds=2", "model_steps=400",
               "batch_size=32", "max_images=256")
    t0 = time.time()
    while not (out / "config.json").exists() and run.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert run.poll() is None, run.stderr.read()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 143
    assert run.stderr.read().strip().splitlines() == ["nsvit-fast: terminated (SIGTERM)"]
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if n in ("config.json", ".nsvit.lock") or n.endswith(".tmp")], left


def test_analyze_into_a_folder_in_use_is_refused(tmp_path, capsys):
    # two studies on one --out: both ran, and one's figure could sit beside the other's JSON
    from nsvit_fast.cli import main

    with _lock_held_elsewhere(tmp_path) as pid:
        rc = main(["analyze", "fig3", "--steps", "1", "--lams", "0", "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"in use by another nsvit-fast run (pid {pid} " in err[0], err
        assert not (tmp_path / "fig3_regularized.json").exists()


@pytest.mark.parametrize("argv,flag", [
    (["synth", "--max-steps", "1", "--max-images", "16", "--quiet", "--out", "{f}"], "--out"),
    (["synth", "--max-steps", "1", "--max-images", "16", "--quiet", "--out", "{d}/other.safetensors", "--log", "{f}"],
     "--log"),
    (["fingerprint", "make", "--n", "2", "--report", "{d}/rep", "--fingerprint", "{f}"], "--fingerprint"),
    (["watermark", "--image", "skimage:chelsea", "--out", "{d}/mark.png"], "the .json beside --out"),
])
def test_an_output_file_in_use_is_refused(tmp_path, capsys, argv, flag):
    """Two commands writing one file (two synths on one bank, two fingerprint makes on one
    --fingerprint): both ran, and the file of one ended beside the other's log or printed digest.
    The second is refused at once, in one line naming the holder, and writes nothing."""
    from nsvit_fast.cli import main

    f = tmp_path / ("mark.json" if flag.startswith("the .json") else "f.safetensors")
    with _lock_held_elsewhere(tmp_path, file=f) as pid:
        rc = main([a.format(f=f, d=tmp_path) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"{flag} " in err[0], err
        assert f"is being written by another nsvit-fast run (pid {pid} " in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".{f.name}.nsvit-lock"]  # nothing written


def test_an_output_lock_sweeps_a_killed_runs_temporaries(tmp_path, capsys):
    """A synth killed (-9) while writing leaves its log's temporary (and maybe the bank's) beside
    the outputs: the next run on those names removes them, and only them."""
    from nsvit_fast.cli import main

    junk = [".bank.safetensors.k3j_a9zq.tmp", ".log.jsonl.0a1b2c3d.tmp"]
    kept = [".bank.safetensors.tmp", ".other.safetensors.abcdefgh.tmp", "bank.safetensors.abcdefgh.tmp",
            ".bank.safetensors.userfile.tmp",  # the pattern, but a user's mode (0644): not a temporary of ours
            ".log.jsonl.fresh123.tmp"]  # mkstemp's, but seconds old: a writer that takes no lock may own it
    for n in junk + kept:
        (tmp_path / n).write_text("x")
        os.chmod(tmp_path / n, 0o644 if "userfile" in n else 0o600)
        os.utime(tmp_path / n, (time.time() - (5 if "fresh" in n else 3600),) * 2)
    rc = main(["synth", "--max-steps", "1", "--max-images", "16", "--quiet", "--out", str(tmp_path / "bank.safetensors"),
               "--log", str(tmp_path / "log.jsonl")])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["bank.safetensors", "log.jsonl"])


def test_an_interrupted_synth_leaves_no_folders_it_made(tmp_path):
    """The log's folder was made when synthesis began, and stayed, empty, after a Ctrl-C (or any
    failure) removed the log: the output lock removes the folders it made that are still empty.
    SIGTERM takes Ctrl-C's path (a child of a background shell ignores SIGINT)."""
    log = tmp_path / "new" / "deeper" / "log.jsonl"
    run = _cli("synth", "--quiet", "--max-steps", "100000", "--max-images", "32", "--eps", "1e-9",
               "--out", str(tmp_path / "bank" / "bank.safetensors"), "--log", str(log))
    try:
        t0 = time.time()
        while not (log.parent.exists() and any(log.parent.glob(".log.jsonl.*.tmp"))) and run.poll() is None \
                and time.time() - t0 < 120:
            time.sleep(0.05)
        assert run.poll() is None, run.stderr.read()
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 143, run.stderr.read()
    finally:  # a run that ignored the signal would go on for its 100000 steps after the test
        run.kill()
        run.wait()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == []

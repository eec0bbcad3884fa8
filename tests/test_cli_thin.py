"""The CLI is a thin layer: one data-spec parser (in data/), the analysis commands write through the
API's run_* functions, option choices are the engines' constants, --split is honoured, and
evaluation never picks a split folder (least of all train/) on its own. In-process through
``nsvit_fast.cli.main``, the same code path as the console script."""

import json
import re
from pathlib import Path

import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model
from nsvit_fast.cli import build_parser, main
from nsvit_fast.data import DataSpec, parse_spec, stream_or_load

from helpers import save_pixels, write_digits_folder

CLI = Path(__file__).resolve().parents[1] / "nsvit_fast" / "cli.py"


def cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code, err, msg):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nsvit-fast: error:") and msg in lines[0], err


# -- option choices are the engines' constants, not lists restated by hand --
HAND_WRITTEN = re.compile(r"choices\s*=\s*[\[\(]\s*[\"']")


def test_cli_restates_no_choices_by_hand():
    src = CLI.read_text()
    assert not HAND_WRITTEN.findall(src), HAND_WRITTEN.findall(src)
    # the pattern itself catches the old style
    assert HAND_WRITTEN.search('p.add_argument("--mode", choices=["reference", "fast"])')
    assert HAND_WRITTEN.search("p.add_argument('--augment', choices=('rrc_flip', 'none'))")


def test_choices_are_the_engines_objects():
    from nsvit_fast.analysis.apps import FINGERPRINT_ACTIONS
    from nsvit_fast.analysis.studies import STUDIES
    from nsvit_fast.data import BAD_IMAGE
    from nsvit_fast.data.stream import AUGMENTS
    from nsvit_fast.eval.suite import MCE_REFERENCES
    from nsvit_fast.runtime import PRECISIONS
    from nsvit_fast.synth.engine import LR_SCHEDULES, MODES, SCHEDULES, STOPS

    want = {"--mode": MODES, "--schedule": SCHEDULES, "--stop": STOPS, "--lr-schedule": LR_SCHEDULES,
            "--on-bad-image": BAD_IMAGE, "--augment": AUGMENTS, "--precision": PRECISIONS,
            "--mce-reference": MCE_REFERENCES, "study": STUDIES, "action": FINGERPRINT_ACTIONS}
    seen = set()
    subs = build_parser()._subparsers._group_actions[0].choices
    for name, p in subs.items():
        for a in p._actions:
            if a.choices is None or a.dest == "help":
                continue
            key = a.option_strings[0] if a.option_strings else a.dest
            if key == "what":  # profile's targets: the command's own dispatch table
                continue
            assert key in want and a.choices is want[key], (name, key, a.choices)
            seen.add(key)
    assert seen == set(want)


# -- one data-spec parser --
def test_parse_spec_named_sets_and_splits():
    assert parse_spec("digits") == parse_spec("digits:train") == parse_spec("digits", "train")
    assert parse_spec("digits:val").split == parse_spec("digits", "val").split == "val"
    assert parse_spec("digits", default_split="test").split == "test"
    assert parse_spec("synthetic:test").kind == "synthetic"
    for spec, split, msg in (("digits:val", "test", "names split 'val' but split 'test'"),
                             ("digits:", None, "ends in ':'"), ("digits:nope", None, "digits has splits"),
                             ("synthetic:all", None, "synthetic has splits"), ("/no/such/dir", None, "neither"),
                             ("", None, "must be digits")):
        with pytest.raises(NsvitError, match=re.escape(msg)):
            parse_spec(spec, split)
    assert "load_spec" not in CLI.read_text()  # the CLI's own copy is gone


def _digit_folder(root: Path, split: str, n_per_class: int, shift: int = 0) -> Path:
    """digits test images as 32x32 PNGs in root/split/<class>; ``shift`` files each under a wrong class."""
    ds = digits("test")
    for c in range(10):
        (root / split / str(c)).mkdir(parents=True, exist_ok=True)
    for c in range(10):
        for k, i in enumerate((ds.labels == c).nonzero()[:n_per_class, 0].tolist()):
            save_pixels(ds.images[i], root / split / str((c + shift) % 10) / f"{k}.png")
    return root / split


def test_folder_of_split_folders_needs_a_split(tmp_path):
    _digit_folder(tmp_path, "train", 1)
    _digit_folder(tmp_path, "val", 1)
    with pytest.raises(NsvitError, match="holds the split folders train, val: name one \\(e.g. .*train\\)"):
        parse_spec(tmp_path)  # a training command's split is the example (it was val, for synth and finetune)
    with pytest.raises(NsvitError, match="name one \\(e.g. .*val\\)"):
        parse_spec(tmp_path, default_split="val")
    assert parse_spec(tmp_path, "val").root == tmp_path / "val"
    assert parse_spec(tmp_path / "val").root == tmp_path / "val"  # a class tree is read as given
    with pytest.raises(NsvitError, match="has no split folder 'test'"):
        parse_spec(tmp_path, "test")
    with pytest.raises(NsvitError, match="holds no split folders"):
        parse_spec(tmp_path / "val", "train")
    assert stream_or_load(str(tmp_path), None, "val") == tmp_path / "val"  # a folder streams as its split


def test_a_named_set_is_not_shadowed_by_a_folder_of_its_name(tmp_path, monkeypatch):
    _digit_folder(tmp_path, "digits", 1, shift=1)  # ./digits: every image under the wrong class
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"built-in set; .* \(write \./digits for it\)"):
        assert parse_spec("digits", default_split="test") == DataSpec("digits", "test", None)
    assert parse_spec("./digits").root == Path("./digits")  # the folder, when a path says so
    assert parse_spec(Path("digits")).kind == "folder"


def test_eval_never_evaluates_a_train_folder(tmp_path, capsys):
    # train/ holds every digit under the wrong class: evaluating on it would score about 0%
    root = tmp_path / "d"  # the report beside the data, not in it (an --out inside --data is refused)
    root.mkdir()
    _digit_folder(root, "train", 2, shift=1)
    val = _digit_folder(root, "val", 2)
    code, _, err = cli(capsys, "eval", "--data", root, "--suite", "clean", "--out", tmp_path / "ev", "--quiet")
    one_error(code, err, f"{root} holds the split folders train, val: name one (e.g. {root / 'val'})")
    assert not (tmp_path / "ev" / "report.json").exists()
    code, _, err = cli(capsys, "eval", "--data", val, "--suite", "clean", "--out", tmp_path / "ev", "--quiet")
    assert code == 0, err
    rec = json.loads((tmp_path / "ev" / "report.json").read_text())["records"]
    assert len(rec) == 1 and rec[0]["value"] >= 90  # the val folder, correctly labelled


def test_eval_of_a_bare_named_set_is_its_test_split(tmp_path, capsys):
    code, _, err = cli(capsys, "eval", "--data", "digits", "--suite", "clean", "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    code, _, err = cli(capsys, "eval", "--data", "digits:test", "--suite", "clean", "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["records"] for d in "ab")
    assert a == b
    code, _, err = cli(capsys, "eval", "--data", "digits:train", "--suite", "clean", "--out", tmp_path / "c",
                       "--quiet")
    assert code == 0, err  # train only when asked for, and then it scores differently
    assert json.loads((tmp_path / "c" / "report.json").read_text())["records"][0]["value"] != a[0]["value"]


# -- --split is honoured --
def _member_of(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    return ((x[:, None] - pool[None]).flatten(2).abs().amax(-1) == 0).any(1)


def test_fingerprint_make_follows_split(tmp_path, capsys):
    test, val = digits("test").images, digits("val").images
    for split, pool, other in ((None, val, test), ("test", test, val)):
        fp = tmp_path / f"{split}.safetensors"
        args = ["fingerprint", "make", "--n", "8", "--fingerprint", fp, "--report", tmp_path / "rep"]
        code, _, err = cli(capsys, *args, *(["--split", split] if split else []))
        assert code == 0, err
        from nsvit_fast.analysis import Fingerprint

        imgs = Fingerprint.load(fp).images
        assert _member_of(imgs, pool).all() and not _member_of(imgs, other).any(), split
    code, _, err = cli(capsys, "fingerprint", "make", "--data", "digits:val", "--split", "test",
                       "--fingerprint", tmp_path / "x.safetensors", "--report", tmp_path / "rep")
    one_error(code, err, "names split 'val' but split 'test' was given")


def test_fingerprint_make_reads_a_pool_of_a_folder_not_all_of_it(tmp_path, capsys, monkeypatch):
    # 64 challenges from an ImageNet val folder read all 50k images (30 GB as float32) first
    import nsvit_fast.data as data

    seen, load = [], data.load_data
    monkeypatch.setattr(data, "load_data", lambda *a, **kw: seen.append(a[3]) or load(*a, **kw))
    (tmp_path / "f").mkdir()
    root = write_digits_folder(tmp_path / "f", "val", n=60)
    for extra, want in (([], 32), (["--max-images", "40"], 40)):
        code, _, err = cli(capsys, "fingerprint", "make", "--n", "2", "--data", root, *extra,
                           "--fingerprint", tmp_path / "fp.safetensors", "--report", tmp_path / "rep")
        assert code == 0, err
        assert seen[-1] == want
    code, _, err = cli(capsys, "fingerprint", "make", "--n", "2", "--fingerprint", tmp_path / "d.safetensors",
                       "--report", tmp_path / "rep")
    assert code == 0 and seen[-1] is None, err  # digits is in memory already: all of it


def test_analyze_follows_split(tmp_path, capsys):
    held = {}
    for split in ("val", "test"):
        out = tmp_path / split
        code, _, err = cli(capsys, "analyze", "fig3", "--split", split, "--steps", "1", "--lams", "0", "--out", out)
        assert code == 0, err
        held[split] = json.loads((out / "fig3_regularized.json").read_text())["heldout_images"]
    # a quarter of each split is held out: 200 val images, 397 test images
    assert held == {"val": 50, "test": 99}


# -- the analysis commands write through the API --
def test_cli_builds_no_figures_or_json():
    src = CLI.read_text()
    for name in ("image_grid", "write_json", "save_image", "save_figure", "pyplot"):
        assert name not in src, name


def test_watermark_cli_and_api_write_the_same(tmp_path, capsys):
    from nsvit_fast import load_model
    from nsvit_fast.analysis import run_watermark

    code, _, err = cli(capsys, "watermark", "--image", "skimage:coffee", "--strength", "0.4", "--iters", "20",
                       "--out", tmp_path / "cli.png")
    assert code == 0, err
    torch.manual_seed(0)
    api = run_watermark(load_model("digits_vit"), "skimage:coffee", tmp_path / "api.png", strength=0.4, iters=20)
    assert json.loads((tmp_path / "cli.json").read_text()) == json.loads((tmp_path / "api.json").read_text()) == api
    assert (tmp_path / "cli.png").read_bytes() == (tmp_path / "api.png").read_bytes()
    assert (tmp_path / "api_figure.png").stat().st_size > 5000


def test_targeted_refuses_an_unknown_map_before_work(tmp_path, capsys):
    code, _, err = cli(capsys, "targeted", "--source", "skimage:coffee", "--target", "skimage:cat",
                       "--saliency", "rollout,lrp", "--out", tmp_path / "t.png")
    one_error(code, err, "unknown saliency method 'lrp'")
    from nsvit_fast import load_model
    from nsvit_fast.analysis import run_targeted

    with pytest.raises(NsvitError, match="unknown saliency method 'lrp'"):
        run_targeted(load_model("digits_vit"), "skimage:coffee", "skimage:cat", tmp_path / "t.png", maps=["lrp"])
    assert not list(tmp_path.iterdir())


def test_a_read_only_output_file_is_refused_not_replaced(tmp_path, capsys):
    # the rename went over a chmod 444 file (for root and for everyone else): it was replaced
    ro = tmp_path / "kept.safetensors"
    ro.write_bytes(b"the user's file")
    ro.chmod(0o444)
    code, _, err = cli(capsys, "synth", "--max-steps", "1", "--quiet", "--out", ro)
    one_error(code, err, "is read-only; make it writable or write elsewhere")
    assert ro.read_bytes() == b"the user's file"
    sib = tmp_path / "w.json"  # a sibling written beside --out is checked too
    sib.write_text("{}")
    sib.chmod(0o444)
    code, _, err = cli(capsys, "watermark", "--image", "skimage:coffee", "--out", tmp_path / "w.png")
    one_error(code, err, "w.json is read-only")


def test_a_command_that_fails_midway_changes_none_of_its_files(tmp_path, capsys, monkeypatch):
    # targeted wrote its PNG, then was interrupted in the saliency maps: the new PNG sat beside the
    # old run's JSON and figure; synth renamed its log before the bank's save failed
    from nsvit_fast.analysis import apps
    from nsvit_fast.synth import NoiseBank

    out = tmp_path / "t.png"
    code, _, err = cli(capsys, "targeted", "--source", "skimage:astronaut", "--target", "skimage:chelsea",
                       "--iters", "5", "--saliency", "attention", "--out", out)
    assert code == 0, err
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(files) == {"t.png", "t.json", "t_figure.png"}

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(apps, "saliency", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apps.run_targeted(load_model("digits_vit"), "skimage:chelsea", "skimage:astronaut", out, iters=5,
                          maps=["attention"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # no temporary files left either

    def full_disk(self, path):
        raise NsvitError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(NoiseBank, "save", full_disk)
    log = tmp_path / "s" / "l.jsonl"
    code, _, err = cli(capsys, "synth", "--max-steps", "2", "--quiet", "--out", tmp_path / "s" / "b.safetensors",
                       "--log", log)
    one_error(code, err, "No space left on device")
    assert not log.exists() and not any((tmp_path / "s").glob(".l.jsonl.*"))


def test_a_checkpoint_alone_names_its_model(tmp_path, capsys):
    """A file saved by nsvit-fast records its model: --checkpoint needs no --model. The commands'
    default --model digits_vit refused every other model's file ("holds a vit_small..., not a
    digits_vit") and built a vit_tiny's under the name digits_vit."""
    from nsvit_fast.models import create_model, save_model

    torch.manual_seed(0)
    ck = save_model(create_model("vit_small_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=10),
                    tmp_path / "small.safetensors")
    code, out, err = cli(capsys, "eval", "--checkpoint", ck, "--suite", "clean", "--max-images", "16", "--quiet",
                         "--out", tmp_path / "r")
    assert code == 0, err
    code, out, err = cli(capsys, "synth", "--checkpoint", ck, "--max-steps", "1", "--max-images", "16", "--quiet",
                         "--out", tmp_path / "b.safetensors")
    assert code == 0, err
    from nsvit_fast.synth import NoiseBank

    assert NoiseBank.load(tmp_path / "b.safetensors").meta["model"] == "vit_small_patch16_224"
    # finetune too: the digits config's digits_vit named any checkpoint, and its settings applied
    tiny = save_model(create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=10),
                      tmp_path / "tiny.safetensors")
    code, out, err = cli(capsys, "finetune", "--checkpoint", tiny, "--quiet", "--out", tmp_path / "ft")
    one_error(code, err, "(vit_tiny_patch16_224) takes a --config")
    assert not (tmp_path / "ft").exists()


def test_a_timm_model_at_another_input_size_takes_img_size(tmp_path, capsys):
    """A user's plain state dict of a ViT-Ti/16 trained at 32 px: --img-size builds it at that size
    (as timm's train.py flag); there was no way to, and the error pointed at --num-classes."""
    from nsvit_fast.models import create_model

    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    torch.save(m.model.state_dict(), tmp_path / "small.pth")
    args = ["--model", "vit_tiny_patch16_224", "--checkpoint", tmp_path / "small.pth"]
    code, out, err = cli(capsys, "eval", *args, "--img-size", "32", "--suite", "clean", "--max-images", "16", "--quiet",
                         "--out", tmp_path / "r")
    assert code == 0, err
    code, out, err = cli(capsys, "eval", *args, "--suite", "clean", "--max-images", "16", "--quiet",
                         "--out", tmp_path / "r2")
    one_error(code, err, "does not fit this model")
    code, out, err = cli(capsys, "finetune", "--config", "vit_s_imagenet", *args, "--img-size", "32",
                         "--data", "digits:train", "--quiet", "--out", tmp_path / "ft", "val_data=null", "rounds=1",
                         "model_steps=1", "batch_size=8", "max_images=16", "synth.max_steps=2", "synth.batch_size=8",
                         "synth.heldout=4")
    assert code == 0, err
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["rounds"] == 1


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _imagenet_normalised_digits(path):
    """digits_vit's weights refolded to take ImageNet-normalised input (same logits, exactly in real
    arithmetic), saved as a plain state dict: weights trained with other statistics than their
    architecture's timm config (0.5 / 0.5), which the file does not record."""
    parts = load_model("digits_vit")
    sd = {k: v.clone() for k, v in parts.model.state_dict().items()}
    w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]  # (D, C, r, r), (D,)
    m_a, s_a = (torch.tensor(parts.data_config[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    m_b, s_b = (torch.tensor(v).view(1, -1, 1, 1) for v in IMAGENET)
    sd["patch_embed.proj.bias"] = b + (w * (m_b - m_a) / s_a).sum((1, 2, 3))
    sd["patch_embed.proj.weight"] = w * s_b / s_a
    torch.save(sd, path)
    return parts


def test_mean_and_std_flags_give_the_weights_their_normalisation(tmp_path, capsys):
    """--mean/--std (timm's flags; load_model's mean=/std=; finetune's keys): weights trained with
    ImageNet's statistics under a name whose timm config says 0.5 were normalised wrong, with no way
    to say otherwise, and scored far below their accuracy."""
    f = tmp_path / "imnet.pth"
    orig = _imagenet_normalised_digits(f)
    x = digits("test").images[:64]
    refolded = load_model("digits_vit", checkpoint=f, mean=IMAGENET[0], std=IMAGENET[1])
    with torch.no_grad():
        assert torch.allclose(refolded(x), orig(x), atol=1e-4)
    assert refolded.data_config["mean"] == pytest.approx(IMAGENET[0])

    def clean(*extra, out):
        code, _, err = cli(capsys, "eval", "--model", "digits_vit", "--checkpoint", f, *extra, "--suite", "clean",
                           "--max-images", "200", "--quiet", "--out", tmp_path / out)
        assert code == 0, err
        return json.loads((tmp_path / out / "report.json").read_text())["records"][0]["value"]

    good = clean("--mean", *IMAGENET[0], "--std", *IMAGENET[1], out="good")
    assert good > 95 and clean(out="bad") < good - 20
    # --mean/--std are --checkpoint's: a --compare file keeps its own (they had been forced on it)
    from nsvit_fast import save_model

    plain = save_model(load_model("digits_vit"), tmp_path / "plain.safetensors")
    code, _, err = cli(capsys, "eval", "--model", "digits_vit", "--checkpoint", f, "--mean", *IMAGENET[0], "--std",
                       *IMAGENET[1], "--compare", plain, "--suite", "clean", "--max-images", "200", "--quiet",
                       "--out", tmp_path / "cmp")
    assert code == 0, err
    recs = {r["model"]: r["value"] for r in json.loads((tmp_path / "cmp" / "report.json").read_text())["records"]}
    assert recs[str(plain)] == recs[str(f)] == good
    # finetune records them with the model (config.json's run block, the saved file's metadata)
    ft = ["finetune", "--model", "digits_vit", "--checkpoint", f, "--mean", *IMAGENET[0], "--std", *IMAGENET[1], "--quiet", "val_data=null",
          "rounds=1", "model_steps=1", "batch_size=16", "max_images=32", "method=plain"]
    code, _, err = cli(capsys, *ft, "--out", tmp_path / "ft")
    assert code == 0, err
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["run"]["mean"] == pytest.approx(IMAGENET[0])
    assert load_model(checkpoint=tmp_path / "ft" / "model.safetensors").data_config["std"] == pytest.approx(IMAGENET[1])
    code, _, err = cli(capsys, *ft, "mean=[0.485, 0.456, 0.406]", "--out", tmp_path / "ft2")  # the same value twice
    assert code == 0, err
    code, _, err = cli(capsys, *ft, "std=[0.5, 0.5, 0.5]", "--out", tmp_path / "ft3")
    one_error(code, err, "std is given twice")
    code, _, err = cli(capsys, "nullspace", "--model", "digits_vit", "--std", "0.2", "0.3")
    one_error(code, err, "needs mean/std of 1 or 3 value(s), got 3 and 2 (mean= and std=, or --mean and --std)")
    code, _, err = cli(capsys, "nullspace", "--table1", "--mean", "0.5")
    one_error(code, err, "--table1 takes no --mean")


def test_profile_reads_a_folder_only_as_far_as_its_steps_take(tmp_path, capsys, monkeypatch):
    # the whole folder was read into memory for a few steps: an ImageNet train folder for 20 steps
    import nsvit_fast.data as data_mod

    (tmp_path / "d").mkdir()
    write_digits_folder(tmp_path / "d", n=60)
    read = []
    real = data_mod.load_data
    monkeypatch.setattr(data_mod, "load_data", lambda *a, **k: read.append(real(*a, **k)) or read[-1])
    trace = str(tmp_path / "t.json")
    code, out, err = cli(capsys, "profile", "synth", "--data", str(tmp_path / "d"), "--steps", "2", "--batch-size",
                         "8", "--trace", trace)
    assert code == 0, err
    assert len(read[-1]) == 16 and out.startswith("2 synthesis steps, mode fast, batch 8: ")
    code, out, err = cli(capsys, "profile", "synth", "--data", str(tmp_path / "d"), "--steps", "2", "--batch-size",
                         "8", "--max-images", "40", "--trace", trace)
    assert code == 0 and len(read[-1]) == 40, err


def test_synth_reports_the_stop_and_lr_its_descent_ran_with(tmp_path, capsys):
    # schedule boundary descends at lr x boundary_lr with the held-out stop; the line and the bank
    # said "stop batch" and lr 0.1
    from nsvit_fast.synth import NoiseBank

    out = tmp_path / "b.safetensors"
    code, stdout, err = cli(capsys, "synth", "--schedule", "boundary", "--max-images", "32", "--max-steps", "2",
                            "--batch-size", "16", "--heldout", "8", "--quiet", "--out", out)
    assert code == 0, err
    assert ", stop heldout, lr 0.6, " in stdout.splitlines()[-1], stdout
    meta = NoiseBank.load(out).meta
    assert (meta["descent_stop"], meta["descent_lr"], meta["stop"]) == ("heldout", pytest.approx(0.6), "batch")


def test_a_timm_model_without_weights_is_named_random_in_eval_and_warned_about(tmp_path, capsys):
    # its row was named after the architecture, so it read like the pretrained model's
    code, out, err = cli(capsys, "eval", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10",
                         "--data", "digits", "--max-images", "4", "--suite", "clean", "--quiet", "--out",
                         tmp_path / "ev")
    assert code == 0, err
    assert "| vit_tiny_patch16_224 (random init) |" in out
    assert "vit_tiny_patch16_224 has random weights" in err and "row 'vit_tiny_patch16_224 (random init)'" in err
    code, out, err = cli(capsys, "eval", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10",
                         "--data", "digits", "--max-images", "4", "--suite", "clean", "--quiet", "--names", "rnd",
                         "--out", tmp_path / "ev2")
    assert code == 0 and "row 'rnd' is a random model's" in err, err  # the row it has, not the default name
    code, out, err = cli(capsys, "synth", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--data", "digits",
                         "--max-images", "16", "--max-steps", "1", "--batch-size", "8", "--heldout", "4", "--quiet",
                         "--out", tmp_path / "b.safetensors")
    assert code == 0 and "vit_tiny_patch16_224 has random weights (seed 0)" in err, err
    code, out, err = cli(capsys, "nullspace", "--model", "vit_tiny_patch16_224")  # Table 1 reads random draws
    assert code == 0 and "random weights" not in err


def test_finetune_prints_its_set_up_warnings_when_the_run_starts(tmp_path, capsys, monkeypatch):
    # held until the command succeeded, a warning that the labels were read by position came hours late
    from nsvit_fast.train import engine

    seen_at_start = []
    real_run = engine.Engine.run

    def run(self, *a, **k):
        seen_at_start.append(capsys.readouterr().err)
        return real_run(self, *a, **k)

    monkeypatch.setattr(engine.Engine, "run", run)
    code, out, err = cli(capsys, "finetune", "--quiet", "rounds=1", "model_steps=1", "batch_size=16", "max_images=32",
                         "method=plain", "val_data=digits:train", "--out", tmp_path / "o")
    assert code == 0, err
    assert "the validation data is the training data" in seen_at_start[0]
    assert "the validation data is the training data" not in err  # printed once, at the start


def test_a_dry_run_of_a_fast_config_runs_its_warm_start(capsys, tmp_path):
    """A _fast config differs from its base only from round 1 on (the warm start, growth, cap and
    drift); its dry run stopped after round 0 and so never ran any of it."""
    import json

    for config, rounds in (("digits", 1), ("digits_fast", 2)):
        out = tmp_path / config
        code, _, err = cli(capsys, "finetune", "--config", config, "--dry-run", "--quiet", "max_images=64",
                           "batch_size=16", "synth.batch_size=16", "synth.heldout=16", "--out", out)
        assert code == 0, err
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        rounds_run = [r for r in log if "round" in r and "noise_norm" in r]
        assert len(rounds_run) == rounds, log
        assert ("init_mse_prob" in rounds_run[-1]) == (config == "digits_fast")


def test_help_texts_name_every_registered_method_and_suite(capsys):
    """The finetune and eval descriptions are built from the registries: a new method or suite is
    named there once, with nothing to edit in cli.py."""
    from nsvit_fast.eval.suite import SUITES
    from nsvit_fast.train.methods import METHODS

    code, out, _ = cli(capsys, "finetune", "--help")
    text = " ".join(out.split())
    assert code == 0 and all(text.count(f"{m}") >= 1 for m in METHODS)
    desc = text.split("Finetune with", 1)[1].split("Settings come", 1)[0]
    assert sorted(m for m in METHODS if re.search(rf"\b{m}\b", desc)) == sorted(METHODS), desc
    code, out, _ = cli(capsys, "eval", "--help")
    listed = " ".join(out.split()).split("Suites: ", 1)[1].split(". ", 1)[0].split(", ")
    assert code == 0 and listed == list(SUITES)


def test_synth_heldout_0_is_refused_only_where_the_noise_is_learned(capsys, tmp_path):
    # plain learns no noise: the boundary schedule's held-out images never come into it
    code, _, err = cli(capsys, "finetune", "--config", "digits_fast", "method=plain", "synth.heldout=0", "--dry-run",
                       "--quiet", "max_images=64", "batch_size=16", "--out", tmp_path / "plain")
    assert code == 0, err
    code, _, err = cli(capsys, "finetune", "--config", "digits_fast", "synth.heldout=0", "--dry-run",
                       "--out", tmp_path / "ns")
    one_error(code, err, "synth.heldout 0 leaves synth.schedule=boundary no held-out images")


def test_finetune_random_init_starts_from_the_same_weights_each_time(capsys, tmp_path):
    # the model was built before anything was seeded: the same command started from other weights
    import json

    torch.manual_seed(123)  # whatever the process drew before must not matter
    starts = []
    for i, seed in enumerate((0, 0, 1)):
        torch.rand(i + 1)
        code, _, err = cli(capsys, "finetune", "--quiet", "--config", "vit_s_imagenet", "--data", "digits:train",
                           "--val-data", "digits:val", "--model", "vit_tiny_patch16_224", "--img-size", "32",
                           "--num-classes", "10", "random_init=true", "method=plain", "rounds=1", "model_steps=1",
                           "batch_size=8", "max_images=16", "val_images=8", "workers=0", f"seed={seed}",
                           "--out", tmp_path / str(i))
        assert code == 0, err
        starts.append(json.loads((tmp_path / str(i) / "config.json").read_text())["run"]["start_weights"])
    assert starts[0] == starts[1] != starts[2]  # the run's seed picks the weights


def test_synth_refuses_to_write_over_the_built_in_weights_it_reads(tmp_path, capsys, monkeypatch):
    # synth --out nsvit_fast/assets/digits_vit.safetensors replaced the embedded model with a bank
    # (a copy stands in for the package's file, so a regression breaks only the copy)
    import shutil

    from nsvit_fast.models import embedded

    copy = tmp_path / "digits_vit.safetensors"
    shutil.copy(embedded.CHECKPOINT, copy)
    monkeypatch.setattr(embedded, "CHECKPOINT", copy)
    before = copy.read_bytes()
    small = ["--max-images", "32", "--max-steps", "1", "--batch-size", "16", "--heldout", "8", "--quiet"]
    for flag in ("--out", "--log"):
        other = ["--out", tmp_path / "b.safetensors"] if flag == "--log" else []
        one_error(*cli(capsys, "synth", *small, *other, flag, copy)[::2],
                  f"{flag} {copy} is also the built-in digits_vit weights")
    one_error(*cli(capsys, "fingerprint", "make", "--n", "2", "--fingerprint", copy, "--report",
                   tmp_path / "r")[::2], "is also the built-in digits_vit weights")
    assert copy.read_bytes() == before
    # with --checkpoint the built-in file is not read: writing there is the user's call (pretrain's --out)
    code, _, err = cli(capsys, "synth", *small, "--checkpoint", tmp_path / "b0.safetensors", "--out", copy)
    assert code == 2 and "checkpoint not found" in err


def test_an_upper_case_safetensors_name_is_written_and_read(tmp_path, capsys):
    # the CLI's check took X.SAFETENSORS, NoiseBank.save refused it after the whole descent
    from nsvit_fast.synth import NoiseBank

    out = tmp_path / "B.SAFETENSORS"
    code, _, err = cli(capsys, "synth", "--max-images", "32", "--max-steps", "1", "--batch-size", "16", "--heldout",
                       "8", "--quiet", "--out", out)
    assert code == 0, err
    assert NoiseBank.load(out).noises.shape[0] == 1
    code, _, err = cli(capsys, "pretrain", "--epochs", "1", "--out", tmp_path / "P.SafeTensors")
    assert code == 0, err
    assert load_model("digits_vit", checkpoint=tmp_path / "P.SafeTensors").num_classes == 10  # read as safetensors


def test_profile_says_a_step_is_all_the_noises(tmp_path, capsys):
    # reference mode's 3 steps of 2 noises are 6 single-noise steps: its ms/step is of both noises,
    # comparable to the fast mode's batched step, and the line now says so
    for mode, how in (("reference", "one after another"), ("fast", "batched")):
        code, out, err = cli(capsys, "profile", "synth", "--steps", "2", "--batch-size", "16", "--max-images", "32",
                             "--num-noises", "2", "--mode", mode, "--trace", tmp_path / f"{mode}.json")
        assert code == 0, err
        assert f"ms/step of all 2 noises, {how}" in out.splitlines()[0], out

"""Weights in and out: safetensors with metadata, weights-only torch files, and the bad cases."""

import os
import stat

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


def test_writes_follow_a_link_and_refuse_a_pipe(tmp_path, capsys):
    """The rename had put a plain file where a symbolic link was (its target kept the old content),
    and where a pipe or device was; a pipe as an image or checkpoint was "not found", and one in a
    data folder hung the reader (open() waits for a writer)."""
    from nsvit_fast.cli import main
    from nsvit_fast.data.folders import BadImage, read_rgb
    from nsvit_fast.io import write_text

    (tmp_path / "real.txt").write_text("old")
    os.symlink("real.txt", tmp_path / "link.txt")
    write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "real.txt").read_text() == "new"
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(NsvitError, match="it is not a regular file"):
        write_text(tmp_path / "pipe.png", "x")
    with pytest.raises(BadImage, match="pipe.png is not a readable image .not a regular file"):
        read_rgb(tmp_path / "pipe.png")  # at once: no hang
    for argv, msg in ((["synth", "--max-images", "8", "--log", tmp_path / "pipe.png"], "is not a regular file"),
                      (["watermark", "--image", tmp_path / "pipe.png", "--out", tmp_path / "w.png"],
                       "pipe.png is not a regular file"),
                      (["nullspace", "--model", "digits_vit", "--checkpoint", tmp_path / "pipe.png"],
                       "checkpoint " + str(tmp_path / "pipe.png") + " is not a regular file")):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe.png").st_mode)


def test_a_rewritten_file_keeps_its_mode_and_a_new_one_takes_the_umask(tmp_path):
    # the rename puts a new inode in place: a private file (0600) would come back world-readable
    from nsvit_fast.io import write_text

    p = write_text(tmp_path / "a.txt", "old")
    os.chmod(p, 0o600)
    write_text(p, "new")
    assert p.read_text() == "new" and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    old = os.umask(0o027)
    try:
        q = write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(q).st_mode) == 0o640


def _at_once(body, threads=6, trials=40) -> list[str]:
    """Run body(trial, i) in ``threads`` threads released together, ``trials`` times; returns the
    repr of every exception raised in a thread (the thread's own assertion failures included)."""
    import threading

    errors = []
    for trial in range(trials):
        gate = threading.Barrier(threads)

        def run(i, trial=trial, gate=gate):
            gate.wait()
            try:
                body(trial, i)
            except Exception as e:  # noqa: BLE001 - any failure in a thread is the test's
                errors.append(repr(e))

        started = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for t in started:
            t.start()
        for t in started:
            t.join()
    return errors


def test_output_checks_race_free_and_make_nothing(tmp_path):
    """Ranks (or bench jobs) checking sibling new folders under one missing parent at once all pass:
    the check used to make and remove the parent, under the other checks' feet (a red CI)."""
    from nsvit_fast.errors import NsvitError
    from nsvit_fast.io import check_output_dir, check_output_file

    def check(trial, i):
        if i % 2:
            check_output_dir(tmp_path / f"t{trial}" / "out" / str(i))
        else:
            check_output_file(tmp_path / f"t{trial}" / "out" / str(i) / "x.json")

    assert _at_once(check) == []
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing left
    with pytest.raises(NsvitError, match="File name too long"):
        check_output_dir(tmp_path / "new" / ("n" * 300))
    (tmp_path / "f").write_text("x")
    with pytest.raises(NsvitError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_make_dirs_counts_only_its_own_folders_under_races(tmp_path):
    """Runs into sibling new folders (run_lock, Report.save) each remove only the folders they made,
    and a parent another run removes meanwhile is made again, not an error."""
    import contextlib

    from nsvit_fast.io import current_umask, make_dirs

    def run(trial, i):
        made = make_dirs(tmp_path / f"t{trial}" / "runs" / str(i))
        assert made and made[-1].name == str(i) and all(p.is_relative_to(tmp_path) for p in made)
        for p in reversed(made):  # as a failed save cleans up
            with contextlib.suppress(OSError):  # another run's folder is inside it
                p.rmdir()

    assert _at_once(run) == []
    # each run's own leaf went; a shared parent stays when its maker saw another run inside it
    assert [p for p in tmp_path.rglob("*") if p.name.isdigit() or not p.is_dir()] == []
    assert make_dirs(tmp_path / "a" / "b") == [tmp_path / "a", tmp_path / "a" / "b"]
    assert make_dirs(tmp_path / "a" / "b") == []
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
    finally:
        os.umask(old)


# -- the finetuning engine's boundaries: methods own their configs, the engine names none --

def method_names_in(source: str, names) -> list[str]:
    """Method names used in code: as identifiers or as whole string literals (comments and prose in
    docstrings may mention them)."""
    import ast
    import io
    import tokenize

    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in names:
            hits.append(f"line {tok.start[0]}: {tok.string}")
        elif tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except ValueError:  # an f-string
                continue
            if value in names:
                hits.append(f"line {tok.start[0]}: {tok.string}")
    return hits


def test_the_engine_names_no_method():
    from pathlib import Path

    import nsvit_fast.train.engine as engine
    from nsvit_fast.train import METHODS

    assert method_names_in(Path(engine.__file__).read_text(), set(METHODS)) == []
    # the check sees both spellings of the coupling it replaced
    old = 'elif cfg.method in ("pgd", "trades"):\n    x = cfg.trades_beta + cfg.random.norm\n'
    assert len(method_names_in(old, set(METHODS))) == 3


def test_method_configs_match_the_registry():
    import dataclasses

    from nsvit_fast.train import METHODS, FinetuneConfig
    from nsvit_fast.train.methods import MethodConfigs

    nested = {f.name: type(getattr(MethodConfigs(), f.name)) for f in dataclasses.fields(MethodConfigs)}
    assert nested == {name: m.Config for name, m in METHODS.items() if m.Config is not None}
    assert issubclass(FinetuneConfig, MethodConfigs)
    for name, m in METHODS.items():
        for old, new in m.moved_keys.items():
            assert new in {f.name for f in dataclasses.fields(m.Config)}, (name, old, new)
            assert old not in {f.name for f in dataclasses.fields(FinetuneConfig)}


def test_nested_method_config_and_old_flat_keys():
    from nsvit_fast.train import make_config
    from nsvit_fast.train.methods import method_for

    cfg = make_config(None, {"method": "trades", "trades": {"beta": 2.0}, "pgd.steps": 3})
    assert (cfg.trades.beta, cfg.pgd.steps, cfg.trades.steps) == (2.0, 3, 5)
    assert method_for(cfg, "trades").config.beta == 2.0 and method_for(cfg, "plain").config is None
    for old, new in [("pgd_eps", "use pgd.eps and trades.eps"), ("trades_beta", "use trades.beta"),
                     ("random_norm", "use random.norm")]:
        with pytest.raises(NsvitError, match=f"{old}' moved into the method's own config: {new}"):
            make_config(None, {old: 1.0})
    for bad, msg in [({"pgd": {"epz": 1}}, "unknown pgd key 'epz' \\(did you mean 'eps'"),
                     ({"trades.beta": -1}, "trades.beta must be >= 0"), ({"pgd.steps": 0}, "pgd.steps must be >= 1"),
                     ({"random": {"norms": []}}, "random.norms must be"), ({"random": 3}, "must be a mapping")]:
        with pytest.raises(NsvitError, match=msg):
            make_config(None, bad)


def test_random_reads_its_norms_and_learns_only_when_it_has_none(digits_parts):
    from nsvit_fast.train import RoundContext, get_method
    from nsvit_fast.train.methods.random_noise import RandomConfig

    def never():
        raise AssertionError("the NS noise was learned although the norms were given")

    ctx = RoundContext(digits_parts, 3, seed=7, learn=never)
    v = get_method("random", RandomConfig(match="norm", norms=[2.0, 5.0])).prepare(ctx)
    assert v.shape == digits_parts.token_shape and float(v.norm()) == pytest.approx(5.0)  # the last norm repeats
    assert ctx.info == {"noise_norm": 5.0}
    learned = torch.full(digits_parts.token_shape, 0.5)
    ctx = RoundContext(digits_parts, 0, seed=7, learn=lambda: (learned, {"noise_norm": float(learned.norm())}))
    v2 = get_method("random", RandomConfig(match="norm")).prepare(ctx)
    assert float(v2.norm()) == pytest.approx(float(learned.norm()), rel=1e-5)
    assert ctx.info == {"noise_norm": float(learned.norm())}
    v3 = get_method("random", RandomConfig(match="norm", norm=4.0)).prepare(RoundContext(digits_parts, 0, seed=7, learn=never))
    assert torch.allclose(v3, v2 * (4.0 / v2.norm()))  # same seed, same direction


def test_batch_stream_state_dict_continues_the_same_batches():
    from nsvit_fast.synth.batches import BatchStream

    a = BatchStream(50, 16, seed=3)
    for _ in range(4):  # past an epoch boundary (3 full batches per epoch)
        a.next()
    state = a.state_dict()
    ahead = [a.next() for _ in range(5)]
    b = BatchStream(50, 16, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(ahead, [b.next() for _ in range(5)]))
    with pytest.raises(NsvitError, match="covers 50 items, this stream 40"):
        BatchStream(40, 16).load_state_dict(state)


def test_yaml_run_files_nest_method_configs(tmp_path, monkeypatch):
    from nsvit_fast.train.yamlcfg import find_config, load_run, packaged_configs

    assert {"digits", "vit_s_imagenet", "vit_b_imagenet"} <= set(packaged_configs())
    monkeypatch.chdir(tmp_path)  # outside the checkout: names resolve to the packaged files
    digits_yaml = find_config("digits")
    assert digits_yaml.parent.name == "configs" and digits_yaml.parent.parent.name == "nsvit_fast"
    assert find_config("digits.yaml") == find_config("configs/digits.yaml") == digits_yaml
    mine = tmp_path / "mine.yaml"
    text = digits_yaml.read_text()
    assert "\nmethod: ns\n" in text  # a key is given once (a repeat is an error), so replace it
    mine.write_text(text.replace("\nmethod: ns\n", "\nmethod: trades\n") + "trades:\n  beta: 2.5\n")
    assert find_config(str(mine)) == mine and find_config("mine.yaml") == mine.relative_to(tmp_path)
    run, cfg = load_run(str(mine), {"trades.steps": 2})
    assert (cfg.method, cfg.trades.beta, cfg.trades.steps, run["model"]) == ("trades", 2.5, 2, "digits_vit")
    (tmp_path / "old.yaml").write_text("method: pgd\npgd_steps: 3\n")
    with pytest.raises(NsvitError, match="use pgd.steps"):
        load_run("old.yaml")
    with pytest.raises(NsvitError, match="config 'nope' not found .*digits"):
        find_config("nope")
    # a block override changes its keys, not the block: the config's lim, schedule... were reset
    from nsvit_fast.train.yamlcfg import load_yaml, parse_overrides

    _, fast = load_run("digits_fast")
    _, cfg = load_run("digits_fast", parse_overrides(["synth={eps: 0.02}"]))
    assert cfg.synth.eps == 0.02 and fast.synth.eps != 0.02
    assert (cfg.synth.lim, cfg.synth.schedule, cfg.synth.grow_search) == (
        fast.synth.lim, fast.synth.schedule, fast.synth.grow_search) == (6.0, "boundary", "floor")
    # YAML merge keys (<<: *base) are read (the duplicate-key check refused them), a key beside one wins
    assert load_yaml("a: &x {r: 1, t: 2}\nb:\n  <<: *x\n  r: 3\n") == {"a": {"r": 1, "t": 2}, "b": {"r": 3, "t": 2}}


def test_timm_training_checkpoint_with_ema_weights(tmp_path):
    """A timm train.py checkpoint, as the official evaluation's DAT weights: its args are an
    argparse.Namespace (refused by the weights-only unpickler before), the optimiser state beside
    the weights, and EMA weights read with use_ema / --use-ema (as timm's and the official
    evaluation's use_ema=True)."""
    import argparse

    from nsvit_fast.cli import main

    torch.manual_seed(2)
    src, ema = (load_model("vit_tiny_patch16_224", depth=1, num_classes=5) for _ in range(2))
    opt = torch.optim.AdamW(src.model.parameters())
    p = tmp_path / "vit_tiny-dat.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": src.model.state_dict(),
                "optimizer": opt.state_dict(), "version": 2, "metric": 80.1,
                "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=5e-4, aa="rand-m9", smoothing=0.1),
                "state_dict_ema": ema.model.state_dict()}, p)
    # the official evaluation switches a "dat" checkpoint to ImageNet's mean/std by its name: said, not done
    with pytest.warns(UserWarning, match=r"official evaluation reads DAT weights .* give --mean 0.485 0.456 0.406"):
        plain = load_model("vit_tiny_patch16_224", checkpoint=p, depth=1)
    with pytest.warns(UserWarning, match="official evaluation reads DAT weights"):
        averaged = load_model("vit_tiny_patch16_224", checkpoint=p, depth=1, use_ema=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dat = load_model("vit_tiny_patch16_224", checkpoint=p, depth=1, use_ema=True, mean=[0.485, 0.456, 0.406],
                         std=[0.229, 0.224, 0.225])
    assert dat.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    from nsvit_fast.models.loading import _dat_name

    assert [_dat_name(n) for n in ("a/vit_b-dat.pth.tar", "DAT_vit.pth", "/data/update.pth", "dataset.pt")] == [
        True, True, False, False]
    assert torch.equal(plain.model.head.weight, src.model.head.weight)
    assert torch.equal(averaged.model.head.weight, ema.model.head.weight)
    assert not torch.equal(plain.model.head.weight, averaged.model.head.weight)
    # the file's mean/std hold for its EMA weights too (use_ema dropped them: the default normalisation)
    torch.save({"state_dict": src.model.state_dict(), "state_dict_ema": ema.model.state_dict(),
                "metadata": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}, tmp_path / "meta.pth")
    for use_ema in (False, True):
        got = load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "meta.pth", depth=1, use_ema=use_ema)
        assert got.data_config["mean"] == pytest.approx((0.1, 0.2, 0.3)), use_ema
    # keys of a DDP-wrapped, torch.compile'd model (module._orig_mod.) load as the plain ones
    torch.save({f"module._orig_mod.{k}": v for k, v in src.model.state_dict().items()}, tmp_path / "compiled.pth")
    got = load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "compiled.pth", depth=1)
    assert torch.equal(got.model.head.weight, src.model.head.weight)
    # a Lightning checkpoint: the model under its LightningModule attribute ("model."), next to a loss's
    # weights; the head size (5) is read under the prefix (it was taken as timm's 1000, then "does not fit")
    sd = src.model.state_dict()
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "criterion.weight": torch.ones(5)},
                "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0"}, tmp_path / "lit.ckpt")
    with pytest.warns(UserWarning, match="under 'model.'; left out 1 other entry .e.g. 'criterion.weight'"):
        got = load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "lit.ckpt", depth=1)
    assert got.num_classes == 5 and torch.equal(got.model.head.weight, src.model.head.weight)
    torch.save({f"{who}.{k}": v for who in ("student", "teacher") for k, v in sd.items()}, tmp_path / "two.pth")
    with pytest.raises(NsvitError, match="holds 2 models' weights .under 'student.', 'teacher.'"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "two.pth", depth=1)
    torch.save({"state_dict": src.model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "no_ema.pth")
    with pytest.raises(NsvitError, match="holds no EMA weights"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "no_ema.pth", depth=1, use_ema=True)
    torch.save({"state_dict": src.model.state_dict(), "args": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(NsvitError, match="weights-only"):  # only Namespace is allowed, nothing else
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "evil.pth", depth=1)
    # through the CLI: the embedded model's weights as the EMA of a training checkpoint, scored
    digits = load_model("digits_vit")
    torch.save({"state_dict": {k: v * 0 for k, v in digits.model.state_dict().items()}, "args": argparse.Namespace(),
                "state_dict_ema": digits.model.state_dict()}, tmp_path / "digits.pth.tar")
    digits_file = save_model(digits, tmp_path / "digits.safetensors")  # --compare: not read as EMA
    assert main(["eval", "--model", "digits_vit", "--checkpoint", str(tmp_path / "digits.pth.tar"), "--use-ema",
                 "--compare", str(digits_file), "--suite", "clean", "--max-images", "64",
                 "--out", str(tmp_path / "ev")]) == 0
    import json

    accs = [r["value"] for r in json.loads((tmp_path / "ev" / "report.json").read_text())["records"]]
    assert len(accs) == 2 and min(accs) >= 95  # the trained weights; the zeroed plain ones would score a tenth

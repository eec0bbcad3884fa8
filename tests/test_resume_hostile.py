"""`finetune --resume` on a hand-edited or damaged checkpoint.safetensors: every case exits 2 with
exactly one stderr line ``nsvit-fast: error: ...`` naming the problem, leaves every file of the run
folder byte-identical and adds none. An untouched copy of the same checkpoint resumes.

One real run (ns, warm noise, 2 rounds of 2 steps, checkpoints every step) is stopped right after
its checkpoint inside round 1 (as a kill would), so the checkpoint holds the whole mid-run state:
weights, AdamW state, schedule, RNG, batch stream, the round's noise and the history. Each case
edits a copy of it with safetensors and resumes in process through ``nsvit_fast.cli.main``.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nsvit_fast import cli
from nsvit_fast.train import engine

ARGS = ["finetune", "--config", "digits", "--quiet", "rounds=2", "model_steps=2", "batch_size=16",
        "checkpoint_every=1", "noise_init=warm", "max_images=32", "val_data=null", "synth.max_steps=3",
        "synth.batch_size=16", "synth.heldout=16"]
STOP_AT = (1, 1)  # the checkpoint to resume from: round 1, step 1 of 2
CKPT = "checkpoint.safetensors"


class _Killed(Exception):
    pass


def _main(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _stopped_after_checkpoint(argv) -> None:
    """Run ``argv`` until its checkpoint at STOP_AT is written, then stop it as a kill would."""
    save = engine.Engine.save

    def save_then_die(self, k, s):
        save(self, k, s)
        if (k, s) == STOP_AT:
            raise _Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Engine, "save", save_then_die)
        with pytest.raises(_Killed):
            _main(argv)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    _stopped_after_checkpoint(ARGS + ["--out", str(out)])
    assert (out / CKPT).is_file() and not (out / "model.safetensors").exists()
    return out


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _get(m, key):
    return json.loads(m[key][5:])


def _set(m, key, value):
    m[key] = "json:" + json.dumps(value)


def _progress(key, value):
    def edit(t, m):
        p = _get(m, "progress")
        p[key] = value
        _set(m, "progress", p)
    return edit


def _meta(key, value):
    return lambda t, m: _set(m, key, value)


def _drop_meta(key):
    return lambda t, m: m.pop(key)


def _tensor(key, fn):
    def edit(t, m):
        t[key] = fn(t.get(key))
    return edit


def _drop_tensor(key):
    return lambda t, m: t.pop(key)


def _group(key, value):
    def edit(t, m):
        g = _get(m, "param_groups")
        g[0][key] = value
        _set(m, "param_groups", g)
    return edit


def _sched(key, value):
    def edit(t, m):
        sd = _get(m, "sched")
        sd[key] = value
        _set(m, "sched", sd)
    return edit


def _first_model_key(t):
    return next(k for k in sorted(t) if k.startswith("model/") and t[k].is_floating_point())


NAN = float("nan")
CASES = [
    # metadata removed or of the wrong type
    ("no-progress", _drop_meta("progress"), "metadata 'progress' is missing"),
    ("no-param-groups", _drop_meta("param_groups"), "metadata 'param_groups' is missing"),
    ("no-sched", _drop_meta("sched"), "metadata 'sched' is missing"),
    ("no-history", _drop_meta("history"), "metadata 'history' is missing"),
    ("kind-only", lambda t, m: [m.pop(k) for k in list(m) if k != "kind"], "is missing"),
    ("wrong-kind", _meta("kind", "something/else"), "is not a finetuning checkpoint"),
    ("config-int", _meta("config", 5), "metadata 'config' must be a JSON object"),
    ("history-str", _meta("history", "x"), "metadata 'history' must be a JSON list"),
    ("stream-pos-str", _meta("stream_pos", "x"), "'stream_pos' must be a whole number"),
    ("bad-json", lambda t, m: m.__setitem__("sched", "json:{"), "not valid JSON"),
    # progress out of the config's range
    ("round-abc", _progress("round", "abc"), "progress 'round' must be a whole number"),
    ("round-neg", _progress("round", -3), "progress round -3 is not in 0..2"),
    ("round-big", _progress("round", 7), "progress round 7 is not in 0..2"),
    ("step-big", _progress("step", 9), "progress step 9 is not in 0..1"),
    ("step-float", _progress("step", 1.5), "progress 'step' must be a whole number"),
    ("round-info-list", _progress("round_info", [1]), "progress 'round_info' must be a JSON object"),
    ("round-losses-nan", _progress("round_losses", {"loss": NAN}), "round_losses 'loss' must be a finite"),
    # history
    ("history-short", _meta("history", []), "'history' holds 0 record(s), but 1 round(s) are done"),
    ("history-not-dicts", _meta("history", [5]), "'history' record 0 must be a JSON object"),
    ("history-norm-str", lambda t, m: _set(m, "history", [{**_get(m, "history")[0], "noise_norm": "big"}]),
     "'noise_norm' must be a number or null"),
    ("history-start-str", lambda t, m: _set(m, "history", [{**_get(m, "history")[0], "val_acc_start": "x"}]),
     "'val_acc_start' must be a number or null"),
    ("start-weights-edited", _meta("start_weights", {"evil": [1, 2]}), "'start_weights' must be a weights fingerprint"),
    # optimiser
    ("opt-extra", _tensor("opt/x/exp_avg", lambda v: torch.zeros(1)), "unexpected optimiser tensor 'opt/x/exp_avg'"),
    ("opt-index-big", _tensor("opt/999/exp_avg", lambda v: torch.zeros(1)), "unexpected optimiser tensor"),
    ("opt-shape", _tensor("opt/0/exp_avg", lambda v: torch.zeros(3)), "'opt/0/exp_avg' has shape (3,)"),
    ("opt-dtype", _tensor("opt/0/exp_avg", lambda v: v.double()), "'opt/0/exp_avg' is float64"),
    ("opt-nan", _tensor("opt/0/exp_avg_sq", lambda v: torch.full_like(v, NAN)), "NaN or inf"),
    ("opt-sq-negative", _tensor("opt/1/exp_avg_sq", lambda v: -v - 1), "holds values below 0"),
    ("opt-no-step", _drop_tensor("opt/0/step"), "parameter 0 lacks 'step'"),
    ("opt-step-big", _tensor("opt/0/step", lambda v: torch.tensor(1e6)), "not a step count in 1..3"),
    ("opt-one-gone", lambda t, m: [t.pop(k) for k in list(t) if k.startswith("opt/3/")],
     "the optimiser state of parameter 3 is missing"),
    ("opt-params-str", _meta("opt_params", "x"), "'opt_params' must be a list"),
    ("opt-params-short", lambda t, m: _set(m, "opt_params", _get(m, "opt_params")[1:]),
     "parameter 0 is not listed in 'opt_params'"),
    ("opt-all-gone", lambda t, m: [t.pop(k) for k in list(t) if k.startswith("opt/")], "holds no optimiser state"),
    ("lr-nan", _group("lr", NAN), "param_groups[0] 'lr' must be a finite number"),
    ("lr-big", _group("lr", 5.0), "param_groups[0] 'lr' must be a finite number"),
    ("wd-edited", _group("weight_decay", 0.5), "param_groups[0] 'weight_decay' is 0.5"),
    ("group-unknown-key", _group("magic", 1), "param_groups[0] has an unknown key 'magic'"),
    ("groups-two", lambda t, m: _set(m, "param_groups", _get(m, "param_groups") * 2), "holds 2 group(s)"),
    # scheduler
    ("sched-epoch", _sched("last_epoch", 0), "'sched' last_epoch is 0"),
    ("sched-tmax", _sched("T_max", 100), "'sched' 'T_max' is 100"),
    ("sched-optimizer", _sched("optimizer", 1), "'sched' has an unknown key 'optimizer'"),
    # random generators and batch stream
    ("no-rng", _drop_tensor("rng/torch"), "'rng/torch' (the random generator's state) is missing"),
    ("rng-zeros", _tensor("rng/torch", lambda v: torch.zeros_like(v)), "not a random generator state"),
    ("rng-float", _tensor("rng/torch", lambda v: v.float()), "'rng/torch' is float32"),
    ("gen-short", _tensor("stream/gen", lambda v: torch.zeros(3, dtype=torch.uint8)), "'stream/gen' has shape"),
    ("perm-big", _tensor("stream/perm", lambda v: torch.full_like(v, 10**6)), "not a permutation"),
    ("perm-short", _tensor("stream/perm", lambda v: torch.zeros(2, dtype=torch.long)), "'stream/perm' has shape"),
    ("no-perm", _drop_tensor("stream/perm"), "'stream/perm' (the batch order) is missing"),
    ("pos-big", lambda t, m: (_set(m, "stream_pos", 100000), _set(m, "stream", {"pos": 100000})),
     "'stream_pos' 100000 is not a batch boundary"),
    ("pos-odd", lambda t, m: (_set(m, "stream_pos", 5), _set(m, "stream", {"pos": 5})), "not a batch boundary"),
    # weights and noises
    ("model-nan", lambda t, m: t.__setitem__(k := _first_model_key(t), torch.full_like(t[k], NAN)), "NaN or inf"),
    ("model-missing", lambda t, m: t.pop(_first_model_key(t)), "the model's weights lacks 1 tensor"),
    ("model-extra", _tensor("model/extra.weight", lambda v: torch.zeros(1)), "unexpected tensor 'model/extra.weight'"),
    ("noise-nan", _tensor("run/noise", lambda v: torch.full_like(v, NAN)), "'run/noise' holds"),
    ("noise-gone", _drop_tensor("run/noise"), "tensor 'run/noise' is missing"),
    ("last-noise-shape", _tensor("run/last_ns_noise", lambda v: v[:3]), "'run/last_ns_noise' has shape (3, 96)"),
    ("unknown-tensor", _tensor("foo", lambda v: torch.zeros(1)), "unexpected tensor 'foo'"),
    # a zero warm-start noise divided by zero (warm_max_growth) or trained with no noise at all
    ("last-noise-zero", _tensor("run/last_ns_noise", torch.zeros_like), "'run/last_ns_noise' holds a zero noise"),
    ("noise-f16", _tensor("run/noise", lambda v: v.half()), "'run/noise' is torch.float16, expected torch.float32"),
    # the data and the model's input settings: another folder of the same layout, another mean/std
    ("data-list", _meta("data", [1]), "'data' must be a JSON object with 'train' and 'val'"),
    ("data-empty", _meta("data", {}), "'data' must be a JSON object with 'train' and 'val'"),
    ("data-other-pixels", lambda t, m: _set(m, "data", {**_get(m, "data"), "train": _get(m, "data")["train"][:2]
                                                        + ["0" * 16]}), "belongs to a run on other train data"),
    ("data-config-std", lambda t, m: _set(m, "data_config", {**_get(m, "data_config"), "std": [0.9]}),
     "belongs to a run of a model with other input settings (std [0.9] there"),
    ("data-config-str", _meta("data_config", "x"), "'data_config' must be a JSON object"),
]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("edit,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoint_is_refused_and_changes_nothing(run_dir, tmp_path, capsys, edit, phrase):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    t, m = _read(d / CKPT)
    edit(t, m)
    save_file(t, str(d / CKPT), metadata=m)
    before = _snapshot(d)
    capsys.readouterr()
    rc = _main(ARGS + ["--out", str(d), "--resume"])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("nsvit-fast: error: "), err
    assert phrase in lines[0], lines[0]
    assert str(d / CKPT) in lines[0]
    assert _snapshot(d) == before  # byte-identical, nothing new, nothing removed


@pytest.mark.parametrize("older", [False, True], ids=["untouched", "without-opt-params"])
def test_untouched_checkpoint_resumes(run_dir, tmp_path, capsys, older):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    t, m = _read(d / CKPT)
    if older:  # written before 'opt_params', 'data_config' and the pixel digest were recorded: still resumes
        m.pop("opt_params")
        m.pop("data_config")
        _set(m, "data", {"train": _get(m, "data")["train"][:2], "val": None})
    save_file(t, str(d / CKPT), metadata=m)  # re-saved through the same path as the edits: still fine
    assert _main(ARGS + ["--out", str(d), "--resume"]) == 0, capsys.readouterr().err
    assert (d / "model.safetensors").is_file()
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1]


def test_a_mid_round_resume_logs_what_an_uninterrupted_run_logs(run_dir, tmp_path, capsys):
    """The checkpoint inside round 1 holds the round's losses so far: a resume that lost them logged
    the mean of the steps after it as the round's loss."""
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    (d / "config.json").write_text('{"rounds": 2, "run": {"start_weights": {"evil": [1')  # truncated by hand
    assert _main(ARGS + ["--out", str(d), "--resume"]) == 0, capsys.readouterr().err
    assert _main(ARGS + ["--out", str(tmp_path / "ref")]) == 0, capsys.readouterr().err
    got, want = ([json.loads(line) for line in (f / "log.jsonl").read_text().splitlines()] for f in (d, tmp_path / "ref"))
    # config.json's record of the starting weights is the first start's, not the resumed weights', and
    # comes from the checkpoint (a damaged config.json had lost it, an edited one had been copied over)
    runs = [json.loads((f / "config.json").read_text())["run"] for f in (d, tmp_path / "ref")]
    assert runs[0]["start_weights"] == runs[1]["start_weights"] is not None
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1]
    for a, b in zip(want, got):
        keys = [k for k in a if k.startswith("train_") or k in ("noise_norm", "mse_prob", "synth_steps")]
        assert len(keys) >= 4 and {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-9), keys


def test_a_kill_between_the_last_checkpoint_and_its_logs_is_made_good(tmp_path, capsys):
    # the checkpoint said "done", so the resume ran no round and log.jsonl kept round 0 only;
    # a kill -9 in the middle of a checkpoint's write left its temporary file for good
    out = tmp_path / "run"
    write_logs = engine.Engine.write_logs

    def die_at_the_last(self, rec):
        if rec["round"] == 1:
            raise _Killed
        write_logs(self, rec)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Engine, "write_logs", die_at_the_last)
        with pytest.raises(_Killed):
            _main(ARGS + ["--out", str(out)])
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    stale = out / f".{CKPT}.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert _main(ARGS + ["--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert [json.loads(r)["round"] for r in (out / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert not stale.exists() and (out / "model.safetensors").is_file()


def test_a_run_killed_before_its_first_checkpoint_starts_over(run_dir, tmp_path, capsys):
    # its config.json alone made the folder neither resumable nor reusable (two contradicting lines)
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(run_dir / "config.json", d / "config.json")
    capsys.readouterr()
    assert _main(ARGS + ["--out", str(d)]) == 0
    assert "an earlier run stopped before its first checkpoint" in capsys.readouterr().err
    assert (d / CKPT).is_file() and (d / "model.safetensors").is_file()
    # a config.json of the user's own is not taken for a run's
    e = tmp_path / "theirs"
    e.mkdir()
    (e / "config.json").write_text('{"learning_rate": 3}')
    assert _main(ARGS + ["--out", str(e)]) == 2
    assert "holds another run's config.json" in capsys.readouterr().err
    assert (e / "config.json").read_text() == '{"learning_rate": 3}'


def test_resume_on_another_folder_of_the_same_layout_is_refused(tmp_path, capsys):
    # a folder cut by max_images is read into memory; its identity was its size and labels, so the
    # same digits inverted resumed (train loss 1.8 -> 6.2 in the review's run)
    import numpy as np
    from PIL import Image
    from helpers import save_pixels, write_digits_folder

    (tmp_path / "a").mkdir()
    write_digits_folder(tmp_path / "a", n=32)
    for p in sorted((tmp_path / "a").rglob("*.png")):
        q = tmp_path / "b" / p.parent.name / p.name
        q.parent.mkdir(parents=True, exist_ok=True)
        save_pixels(1 - torch.tensor(np.asarray(Image.open(p).convert("RGB")), dtype=torch.float32).permute(2, 0, 1)
                    / 255, q)
    out = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("max_images")] + ["max_images=32", "--out", str(out)]
    _stopped_after_checkpoint(args + ["--data", str(tmp_path / "a")])
    capsys.readouterr()
    assert _main(args + ["--data", str(tmp_path / "b"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to a run on other train data" in err[0], err
    assert _main(args + ["--data", str(tmp_path / "a"), "--resume"]) == 0, capsys.readouterr().err


def test_resume_after_a_class_folder_was_renamed_is_refused(tmp_path, capsys):
    # a streamed folder was named by its path alone: `mv dog aardvark` between a stop and --resume
    # shifted every label by one, and the run went on, recording the new names with the model
    from helpers import write_digits_folder

    (tmp_path / "data").mkdir()
    data = write_digits_folder(tmp_path / "data", n=48)
    out = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("max_images")] + ["workers=0", "--data", str(data), "--out", str(out)]
    _stopped_after_checkpoint(args)
    (data / "digit9").rename(data / "digit_aardvark")
    capsys.readouterr()
    assert _main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class folders of" in err[0] and "(digit9 gone, digit_aardvark new)" in err[0], err
    (data / "digit_aardvark").rename(data / "digit9")
    assert _main(args + ["--resume"]) == 0, capsys.readouterr().err
    run = json.loads((out / "config.json").read_text())["run"]
    assert run["train_data"] == {"folder": str(data.resolve()), "classes": [f"digit{i}" for i in range(10)]}


def test_rows_stream_and_a_stopped_round_keeps_its_seconds(tmp_path, capsys):
    # each round's row was printed only after the last round, a stop printed none, and a round
    # resumed mid-way counted only the seconds after the resume (less than its own synthesis)
    import time

    out = tmp_path / "run"
    save = engine.Engine.save

    def slow_then_stop(self, k, s):
        if (k, s) == STOP_AT:
            time.sleep(0.4)  # seconds of round 1 before the stop
        save(self, k, s)
        if (k, s) == STOP_AT:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Engine, "save", slow_then_stop)
        assert _main([a for a in ARGS if a != "--quiet"] + ["--out", str(out)]) == 130
    so = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in so if ln.split() and ln.split()[0].replace(".", "").isdigit()]
    assert [r[0] for r in rows] == ["0"], so  # round 0's row, printed as it ended
    assert so[-1] == f"stopped: {out} holds the run's checkpoint; the same command with --resume goes on"
    assert _main(ARGS + ["--out", str(out), "--resume"]) == 0
    so = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in so if ln.split() and ln.split()[0].isdigit()] == ["0", "1"], so
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert recs[1]["round_seconds"] >= 0.4 + recs[1]["synth_seconds"], recs[1]

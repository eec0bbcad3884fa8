"""The subcommands end to end through ``nsvit_fast.cli.main``, in process (the console script's code
path; a subprocess each cost ~5 s of imports), and the demo and --help in a subprocess as a user
runs them. The bad-input cases live in test_hostile.py, which runs them all in one forked batch."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nsvit_fast import NsvitError
from nsvit_fast.cli import build_parser, main


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nsvit_fast", *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit code, stdout, stderr) of nsvit_fast.cli.main(args), in this process."""
    def call(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return call


def test_help_on_every_subcommand(capsys):
    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    assert {"nullspace", "pretrain", "demo"} <= set(names)
    # in process: --help exits inside parse_args, before any subcommand runs (a subprocess each was 48 s)
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0 and "usage: nsvit-fast " + name in capsys.readouterr().out
    r = run("finetune", "--help")  # and once as a user runs it
    assert r.returncode == 0 and "usage: nsvit-fast finetune" in r.stdout


def test_nullspace_json_vit_small_patch32(cli):
    r = cli("nullspace", "--model", "vit_small_patch32_224", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"model": "vit_small_patch32_224", "patch_size": 32, "input_dim": 3072, "embed_dim": 384,
                   "rank": 384, "nullspace_dim": 2688}
    # a digits checkpoint was labelled vit_tiny_patch16_224 beside patch 8 and D 96: now its path
    ck = Path(__file__).parents[1] / "nsvit_fast" / "assets" / "digits_vit.safetensors"
    r = cli("nullspace", "--checkpoint", str(ck), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["model"] == str(ck), r.stdout


def test_demo_writes_figure_and_report(tmp_path):
    # the whole pipeline on a 2-round budget: nullspace, ns / plain / random finetuning, evaluation
    r = run("demo", "--out", str(tmp_path), "--quick", timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "demo.json").read_text())
    assert out["test_accuracy"] >= 0.97
    assert out["nullspace"]["nullspace_dim"] == 96
    assert out["invariance_float32"]["predictions_match"] == 1.0
    assert out["invariance_float32"]["logits_rel"] <= 1e-5
    assert out["invariance_float64"]["logits_rel"] <= 1e-10
    assert out["invariance_float32"]["noise_to_image_norm"] >= 9.99
    png = (tmp_path / "fig2_nullspace_noise.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = (tmp_path / "report.md").read_text()
    assert "nullspace dim" in report and "| Clean | FGSM (eps=1/255) | FGSM (eps=8/255) | PGD | Average |" in report
    import re

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) >= 3 and all((tmp_path / f).is_file() for f in links), links  # it linked a corruptions figure
    assert "C↓" not in report and "corruptions" not in report  # --quick runs none: no note about them
    from nsvit_fast.eval import Report

    rep = Report.from_dict(out["finetune"]["report"])
    assert rep.models == ["pretrained", "ns", "plain", "random"]
    for m in rep.models:
        clean, fgsm8 = rep.values(m, "clean")[0], rep.values(m, "fgsm", "eps=8/255")[0]
        assert 90 <= clean <= 100 and 0 <= fgsm8 <= clean
        assert f"| {m} | {clean:.2f}" in report
    ns_hist = out["finetune"]["histories"]["ns"]
    assert len(ns_hist) == 2 and all(h["converged"] for h in ns_hist)
    assert f"| start | - | - | - | {ns_hist[0]['val_acc_start']:.3f} |" in report  # Fig. 4's starting point
    # random got the ns run's norms, round by round
    assert [h["noise_norm"] for h in out["finetune"]["histories"]["random"]] == [h["noise_norm"] for h in ns_hist]
    for f in ("fig4_trend.png", "eval/suites.png", "finetune/ns/model.safetensors"):
        assert (tmp_path / f).stat().st_size > 1000
    assert len((tmp_path / "eval" / "report.csv").read_text().splitlines()) == 1 + 4 * 4  # header + models x suites
    # the demo's finetunes stop as Algorithm 1 (stop=batch): their MSE-prob is in-sample, not held-out
    assert "| MSE-prob (train sample) |" in report and "held-out MSE-prob" not in report
    # a second demo on a folder in use is refused before it writes (it rewrote Fig. 2 first)
    from nsvit_fast.demo import run_demo
    from nsvit_fast.runlock import run_lock

    before = png
    with run_lock(tmp_path):
        with pytest.raises(NsvitError, match="in use by another nsvit-fast run"):
            run_demo(tmp_path, scale=2.0, quick=True, log=lambda *_: None)
    assert (tmp_path / "fig2_nullspace_noise.png").read_bytes() == before


def test_synth_writes_a_bank(cli, tmp_path):
    out = tmp_path / "bank.safetensors"
    r = cli("synth", "--data", "digits", "--lim", "4", "--batch-size", "64", "--num-noises", "2",
            "--out", str(out), "--log", str(tmp_path / "log.jsonl"), "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["num_noises"] == 2 and all(summary["converged"]) and summary["eps"] == 0.03
    from nsvit_fast.synth import NoiseBank

    bank = NoiseBank.load(out)
    assert bank.noises.shape == (2, 16, 96) and bank.steps.tolist() == summary["steps"]
    assert (tmp_path / "log.jsonl").read_text().count("\n") >= max(summary["steps"])
    # stop=batch (the default) measures on a training sample: its column said "held-out"
    r = cli("synth", "--data", "digits", "--max-steps", "2", "--max-images", "64", "--out",
            str(tmp_path / "b2.safetensors"), "--quiet")
    assert r.returncode == 0 and "MSE-prob (train)" in r.stdout and "held-out" not in r.stdout, r.stdout


def test_profile_synth_reports_phases(tmp_path):
    trace = tmp_path / "trace.json"  # a subprocess: kineto logs to file descriptor 2, past capsys
    r = run("profile", "synth", "--steps", "5", "--batch-size", "32", "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    for phase in ("noisy_forward", "backward", "optimizer", "host_sync"):
        assert phase in r.stdout
    shares = {l.split()[0]: float(l.split()[-1].rstrip("%")) for l in r.stdout.splitlines()
              if l.split() and l.split()[-1].endswith("%")}
    assert sum(shares.values()) == pytest.approx(100, abs=1)
    # the floor (noisy forward + input backward) dominates the step's own overheads; not a fixed share,
    # which moves with the machine and its load (the first step's clean forward fills the cache)
    overhead = sum(shares[k] for k in ("data", "loss_and_stop", "optimizer", "host_sync"))
    assert shares["noisy_forward"] + shares["backward"] > 3 * overhead, shares
    assert json.loads(trace.read_text())["traceEvents"]
    # the batch a step took (16 images: all of them), and no cache in reference mode (it said 128 and "cache fills")
    r = run("profile", "synth", "--steps", "1", "--max-images", "16", "--mode", "reference", "--trace",
            str(tmp_path / "ref.json"))  # not the default ./synth_trace.json, in the checkout
    assert r.returncode == 0 and r.stdout.startswith("1 synthesis steps, mode reference, batch 16: "), r.stdout
    assert "cache" not in r.stdout.splitlines()[0]
    assert "USDT" not in r.stderr and "profiler_start" not in r.stderr  # kineto's markers stay off the terminal


def test_eval_compares_checkpoints_and_writes_a_report(cli, tmp_path):
    from nsvit_fast import load_model, save_model

    other = load_model("digits_vit")
    with torch.no_grad():
        other.model.head.bias.add_(torch.linspace(-1, 1, 10))
    ck = save_model(other, tmp_path / "other.safetensors")
    r = cli("eval", "--suite", "clean;fgsm:eps=8/255", "--max-images", "48", "--compare", str(ck),
            "--names", "base,shifted", "--seeds", "0,1", "--out", str(tmp_path / "ev"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| model | Clean | FGSM (eps=8/255) | Average |" in r.stdout and "| base |" in r.stdout and "| shifted |" in r.stdout
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert {x["seed"] for x in rep["records"]} == {0, 1} and len(rep["records"]) == 2 * 2 * 2
    assert (tmp_path / "ev" / "suites.png").stat().st_size > 1000


def test_watermark_targeted_fingerprint_commands(cli, tmp_path):
    r = cli("watermark", "--image", "skimage:coffee", "--out", str(tmp_path / "wm.png"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "wm.json").read_text())
    assert out["float"]["predictions_match"] == 1.0 and (tmp_path / "wm_figure.png").is_file()
    r = cli("targeted", "--source", "skimage:astronaut", "--target", "skimage:chelsea", "--out", str(tmp_path / "t.png"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "t.json").read_text())["logits_rel_to_source"] < 1e-5
    rep = tmp_path / "rep"
    r = cli("fingerprint", "make", "--fingerprint", str(tmp_path / "fp.safetensors"), "--n", "32", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    assert json.loads((rep / "fingerprint_make.json").read_text())["owner_check"]["verified"]
    assert (rep / "fingerprint_make.png").stat().st_size > 5000
    r = cli("fingerprint", "verify", "--fingerprint", str(tmp_path / "fp.safetensors"), "--report", str(rep))
    assert r.returncode == 0 and "VERIFIED" in r.stdout
    assert json.loads((rep / "fingerprint_verify.json").read_text())["score"] < 1e-4

"""The bench scripts' own input checks and the no-run reports of bench/alg1_band.py and
bench/pool_seeds.py, through the scripts themselves (subprocesses, as a user runs them)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "bench" / "results"


def run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_alg1_band_reads_two_seed_sets_and_scores_algorithm_1_against_itself(tmp_path):
    a, b = RES / "noise_cost.json", RES / "noise_bank_seeds345" / "noise_cost.json"
    p = run(ROOT / "bench" / "alg1_band.py", a, b, "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "alg1_band.json").read_text())
    first = out["pairs"][0]
    # recomputed here from the two files, so a wrong comparison in the script fails
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    band = {m["metric"]: (m["alg1_mean"], m["alg1_std"]) for m in da["metrics"]}
    other = {m["metric"]: m["alg1_mean"] for m in db["metrics"]}
    want = {k: abs(other[k] - band[k][0]) <= band[k][1] for k in band if k in other}
    assert {r["metric"]: r["within_1std"] for r in first["rows"]} == want
    assert first["within"] == sum(want.values()) and first["of"] == len(want) == 9
    assert f"**{first['within']} of 9**" in (tmp_path / "alg1_band.md").read_text()


@pytest.mark.parametrize("argv, line", [
    (["{A}", "{A}"], "both files are on seeds"),
    (["{A}", "README.md"], "not a noise_cost.json"),
    (["{A}", "missing.json"], "not a noise_cost.json"),
])
def test_alg1_band_bad_input_is_one_line_exit_2(argv, line, tmp_path):
    a = str(RES / "noise_cost.json")
    p = run(ROOT / "bench" / "alg1_band.py", *[x.replace("{A}", a) for x in argv], "--out", tmp_path)
    assert p.returncode == 2 and line in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "alg1_band.json").exists()


def test_pool_seeds_pools_per_seed_values_and_pairs_them_by_seed(tmp_path):
    a, b = RES / "grow_search" / "noise_cost.json", RES / "grow_search_seeds345" / "noise_cost.json"
    p = run(ROOT / "bench" / "pool_seeds.py", a, b, "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "pooled_seeds.json").read_text())
    assert out["seeds"] == [0, 1, 2, 3, 4, 5] and list(out["variants"]) == ["ns fast", "ns fast, floor"]
    rows = {r["metric"]: r for r in out["variants"]["ns fast, floor"]}
    # recomputed from the two files' records, so a wrong pooling or pairing fails
    recs = [r for f in (a, b) for r in json.loads(f.read_text())["report"]["records"]
            if r["suite"] == "fgsm" and r["setting"] == "eps=8/255" and r["metric"] == "acc"]
    alg1 = {r["seed"]: r["value"] for r in recs if r["model"] == "ns (Algorithm 1)"}
    fast = {r["seed"]: r["value"] for r in recs if r["model"] == "ns fast, floor"}
    assert sorted(alg1) == sorted(fast) == list(range(6))
    r = rows["FGSM (eps=8/255)"]
    assert r["alg1_mean"] == round(sum(alg1.values()) / 6, 2) and r["variant_mean"] == round(sum(fast.values()) / 6, 2)
    assert r["signed_diff"] > 0 and r["gap_stds"] == pytest.approx(r["signed_diff"] / r["alg1_std"], abs=0.02)
    # every seed's fast run beat its own Algorithm 1 run on FGSM 8/255: a paired test sees it
    assert all(fast[k] > alg1[k] for k in alg1) and r["paired_p"] < 0.05
    assert r["within_1std"] == (abs(r["variant_mean"] - r["alg1_mean"]) <= r["alg1_std"])
    assert rows["C↓"]["metric_key"] == "mce"
    assert "## ns fast, floor: within 1 std on" in (tmp_path / "pooled_seeds.md").read_text()
    # the figure's dots: each seed's difference, whose mean is the bar
    assert r["per_seed_diff"] == pytest.approx([fast[k] - alg1[k] for k in range(6)], abs=1e-3)
    assert sum(r["per_seed_diff"]) / 6 == pytest.approx(r["signed_diff"], abs=0.01)
    assert (tmp_path / "pooled_seeds.png").stat().st_size > 10_000


def test_pool_seeds_rename_lines_up_a_variant_two_files_name_differently(tmp_path):
    # warm_cap1 ran after floor became digits_fast's search ("ns fast" there), grow_search_seeds345
    # before it ("ns fast, floor" there; its "ns fast" is the secant search)
    a, b = RES / "warm_cap1" / "noise_cost.json", RES / "grow_search_seeds345" / "noise_cost.json"
    p = run(ROOT / "bench" / "pool_seeds.py", a, b, "--rename", "1:ns fast=ns fast, floor", "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "pooled_seeds.json").read_text())
    assert list(out["variants"]) == ["ns fast, floor"] and out["renamed"] == ["1:ns fast=ns fast, floor"]
    clean = next(r for r in out["variants"]["ns fast, floor"] if r["metric"] == "Clean")
    recs = [r for f, name in ((a, "ns fast"), (b, "ns fast, floor"))
            for r in json.loads(f.read_text())["report"]["records"]
            if r["model"] == name and r["suite"] == "clean" and r["metric"] == "acc"]
    assert len(recs) == 6 and clean["variant_mean"] == round(sum(r["value"] for r in recs) / 6, 2)


@pytest.mark.parametrize("argv, line", [
    (["{A}", "{A}"], "are in an earlier file too"),
    (["{A}"], "at least two"),
    (["{A}", "{B}", "--rename", "3:ns fast=x"], "--rename wants N:OLD=NEW"),
    (["{A}", "{B}", "--rename", "1:ns fastt=x"], "file 1 has models"),
    (["{A}", "{B}", "--rename", "1:ns fast=ns fast, floor"], "file 1 has models"),
    (["{A}", "{B}", "--out", "/sys/nsvit"], "cannot"),
    (["{A}", "{B}", "--out", "{A}"], "is a file, not a folder"),
    (["{A}", "README.md"], "not a noise_cost.json"),
    (["{A}", "missing.json"], "not a noise_cost.json"),
])
def test_pool_seeds_bad_input_is_one_line_exit_2(argv, line, tmp_path):
    a, b = str(RES / "grow_search" / "noise_cost.json"), str(RES / "grow_search_seeds345" / "noise_cost.json")
    # the case's own --out, if any, comes last and wins
    p = run(ROOT / "bench" / "pool_seeds.py", "--out", tmp_path, *[x.replace("{A}", a).replace("{B}", b) for x in argv])
    assert p.returncode == 2 and line in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("also, line", [
    ("bank 2", "NAME=key=value"),
    ("bank=noise_bogus=2", "noise_bogus"),
    ("bank=noise_bank=zero", "noise_bank"),
])
def test_noise_cost_bad_also_fails_before_any_run(also, line, tmp_path):
    p = run(ROOT / "bench" / "noise_cost.py", "--also", also, "--out", tmp_path)
    assert p.returncode == 2 and line in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


def test_noise_cost_render_rewrites_the_stored_report_and_draws_its_figure(tmp_path):
    """--render of a stored run gives back its committed noise_cost.md byte for byte, and a PNG."""
    src = RES / "grow_search"
    p = run(ROOT / "bench" / "noise_cost.py", "--render", src / "noise_cost.json", "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "noise_cost.md").read_text() == (src / "noise_cost.md").read_text()
    assert (tmp_path / "noise_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noise_cost_figure_plots_per_round_means_and_signed_std_gaps(tmp_path):
    """The figure's values, recomputed here from the JSON: per-round synthesis seconds averaged over
    seeds, and each metric's gap to Algorithm 1 in its stds with mCE flipped (lower mCE is better)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import noise_cost
    finally:
        sys.path.remove(str(ROOT / "bench"))
    d = json.loads((RES / "grow_search" / "noise_cost.json").read_text())
    got = noise_cost.figure(d, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000
    assert list(got["per_round"]) == ["ns (Algorithm 1)", "ns fast", "ns fast, walk", "ns fast, floor"]
    seeds = [r for r in d["rows"] if r["variant"] == "ns fast, floor"]
    assert len(seeds) == 3 and got["per_round"]["ns fast, floor"][0] == pytest.approx(
        sum(r["synth_seconds_per_round"][0] for r in seeds) / 3)
    # round 0 learns from a fresh draw; the warm rounds after it cost a fraction of that
    assert max(got["per_round"]["ns fast, floor"][1:]) < 0.2 * got["per_round"]["ns fast, floor"][0]
    m = {x["metric"]: x for x in d["others"]["ns fast, floor"]["metrics"]}
    cw, mce = m["CW"], next(x for x in m.values() if x["metric_key"] == "mce")
    assert got["gap"]["ns fast, floor"]["CW"] == pytest.approx((cw["fast_mean"] - cw["alg1_mean"]) / cw["alg1_std"])
    assert got["gap"]["ns fast, floor"][mce["metric"]] == pytest.approx(
        (mce["alg1_mean"] - mce["fast_mean"]) / mce["alg1_std"])
    # the 1-std verdicts in the JSON and the figure's band agree
    assert {k: abs(g) <= 1 for k, g in got["gap"]["ns fast, floor"].items()} == {
        k: x["within_1std"] for k, x in m.items()}


def test_noise_cost_report_signs_each_gap_and_names_the_metrics_that_are_worse():
    """The .md gives each metric's gap in Algorithm 1's stds (+ more robust, mCE flipped) beside the
    1-std verdict, and names the metrics more than 1 std less robust: none in the stored run; CW once
    its fast mean is edited 2 stds below Algorithm 1's. And what hiding synthesis could give at most."""
    from types import SimpleNamespace

    from nsvit_fast.eval.report import Report

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import noise_cost
    finally:
        sys.path.remove(str(ROOT / "bench"))
    d = json.loads((RES / "grow_search" / "noise_cost.json").read_text())
    args = SimpleNamespace(rounds=d["rounds"], seeds=d["seeds"])

    def md(d):
        return noise_cost.render(d, d["metrics"], d["rows"], Report.from_dict(d["report"]), d["machine"], args)

    cw = next(m for m in d["metrics"] if m["metric"] == "CW")
    gap = (cw["fast_mean"] - cw["alg1_mean"]) / cw["alg1_std"]
    text = md(d)
    assert "| Table-2 metrics less robust than Algorithm 1 by > 1 std | none |" in text
    # direction 4's ceiling: the fast run's wall with all of its synthesis taken out, over plain's
    wall, synth, plain = (sum(r[k] for r in d["rows"] if r["variant"] == v) for v, k in
                          (("ns fast", "wall_seconds"), ("ns fast", "synth_seconds"), ("plain", "wall_seconds")))
    assert f"Synthesis is {synth / wall:.1%} of the fast run's wall time" in text
    assert f"its ns_over_plain_wall would be {(wall - synth) / plain:.2f} at best" in text
    assert (wall - synth) / plain < d["ns_over_plain_wall"]
    assert f"| CW | {cw['alg1_mean']:.2f} ± {cw['alg1_std']:.2f} | {cw['fast_mean']:.2f} ± {cw['fast_std']:.2f} | " \
           f"{gap:+.1f} | {cw['within_1std']} |" in text
    cw["fast_mean"] = cw["alg1_mean"] - 2 * cw["alg1_std"]
    assert "| Table-2 metrics less robust than Algorithm 1 by > 1 std | CW |" in md(d)
    # Algorithm 1's seeds agreeing exactly (std 0, as Clean on seeds 3-5): any difference is infinite stds
    mce = next(m for m in d["metrics"] if m["metric_key"] == "mce")
    mce.update(alg1_std=0.0, fast_mean=mce["alg1_mean"] + 1)
    assert noise_cost.std_gap(mce) == -math.inf and noise_cost.worse(d["metrics"]) == "CW, C↓"


@pytest.mark.parametrize("bad", ["missing.json", "README.md", "pyproject.toml", "{}", "[1]", "no rounds"])
def test_noise_cost_render_bad_file_is_one_line_exit_2(bad, tmp_path):
    if bad in ("{}", "[1]", "no rounds"):  # JSON, but not a noise_cost.json (or a hand-cut one)
        d = json.loads((RES / "grow_search" / "noise_cost.json").read_text())
        d.pop("rounds")
        (tmp_path / "in").mkdir()
        f = tmp_path / "in" / "bad.json"
        f.write_text(json.dumps(d) if bad == "no rounds" else bad)
        bad, tmp_path = f, tmp_path / "out"
        tmp_path.mkdir()
    p = run(ROOT / "bench" / "noise_cost.py", "--render", bad, "--out", tmp_path)
    assert p.returncode == 2 and "not a noise_cost.json" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_noise_cost_short_run_reports_where_synthesis_time_went(tmp_path):
    """Two rounds of the three variants, scored on the clean suite: the device is named, and each
    run's synthesis time is split by phase, the warm start's growth search charged to grow."""
    # half the config's lim and 10 model steps: descents of tens of steps, not hundreds (25 s, not 72 s)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "noise_cost.py"), "--seeds", "0", "--rounds", "2",
                        "--suites", "clean", "--out", str(tmp_path), "synth.lim=3", "model_steps=10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    d = json.loads((tmp_path / "noise_cost.json").read_text())
    cuda = torch.cuda.is_available()  # the runs used CUDA where there is one: the timings are labelled so
    assert ("(CUDA)" in d["machine"]) == cuda and d["machine"].startswith("CPU") != cuda
    rows = {r["variant"]: r for r in d["rows"]}
    assert list(rows) == ["plain", "ns (Algorithm 1)", "ns fast"] and rows["plain"]["synth_phase_seconds"] == {}
    for v in ("ns (Algorithm 1)", "ns fast"):
        ph, total = rows[v]["synth_phase_seconds"], sum(rows[v]["synth_seconds_per_round"])
        assert list(ph) == ["setup", "grow", "descent", "to_boundary", "metrics"]
        assert 0.5 * total <= sum(ph.values()) <= total + 0.01 and ph["descent"] > 0
    assert rows["ns fast"]["synth_phase_seconds"]["grow"] > rows["ns (Algorithm 1)"]["synth_phase_seconds"]["grow"]
    assert "Where the synthesis time went" in (tmp_path / "noise_cost.md").read_text()


def test_confirm_share_counts_the_held_out_reads_of_a_real_round_0(tmp_path):
    p = run(ROOT / "bench" / "confirm_share.py", "--seeds", "0", "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    (r,) = json.loads((tmp_path / "confirm_share.json").read_text())["rows"]
    # the boundary schedule stops on a confirmed held-out pass: at least one read, the last one passing
    assert r["confirmations"] >= 1 and r["passed"] == 1 and r["descent_steps"] > 0
    assert 0 < r["confirm_seconds"] < r["loop_seconds"] and r["confirm_share"] < 0.5


@pytest.mark.parametrize("seeds", ["a", "-1", ""])
def test_confirm_share_bad_seeds_exit_2(seeds, tmp_path):
    p = run(ROOT / "bench" / "confirm_share.py", "--seeds", seeds, "--out", tmp_path)
    assert p.returncode == 2 and "--seeds" in p.stderr and "Traceback" not in p.stderr

"""Report: every number with its model, seed, suite, setting and metric; the paper's Table 2 layout.

Table 2 (paper): models as rows; Clean, PatchFool, CW, FGSM, DamageNet, A, C (mCE, lower is
better), V2, R, Sketch, Stylized; Average = mean of the columns present with C entering as
100 - mCE (the paper's own rows satisfy this: ViT-S 26.54, ViT-B + NS 39.39), each at the paper's
setting (a registry default; FGSM eps 1/255): a column at another setting is labelled with it and left
out of the Average. Suites outside the paper (PGD, AutoAttack, nullspace metrics...) become extra
columns, outside the Average.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
import statistics
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import NsvitError
from ..io import make_dirs, os_error, save_figure, write_json, write_text

TABLE2 = [("clean", "Clean"), ("patchfool", "PatchFool"), ("cw", "CW"), ("fgsm", "FGSM"),
          ("damagenet", "DamageNet"), ("imagenet-a", "A"), ("corruptions", "C↓"), ("imagenet-v2", "V2"),
          ("imagenet-r", "R"), ("imagenet-sketch", "Sketch"), ("stylized", "Stylized")]
EXTRA = [("pgd", "PGD"), ("pgd_l2", "PGD-L2"), ("autoattack", "AutoAttack"), ("corruption_acc", "C acc"),
         ("nullspace", "NS match"), ("noisebank", "Bank match")]
LABELS = dict(TABLE2 + EXTRA)
HEADLINE = {"corruptions": "mce", "nullspace": "match_rate", "noisebank": "match_rate"}  # else "acc"
LOWER_IS_BETTER = {"corruptions"}
APPROX_ALEXNET = "alexnet(approx)"  # mCE on on-the-fly corruptions normalised by AlexNet's ImageNet-C errors
PARTIAL_C = "partial="  # corruption_acc over a partial ImageNet-C tree: "partial=74/75" (folders scored)
# the setting the paper's Average takes where a suite ran at several (FGSM eps 1/255, App. C; mCE vs AlexNet)
PAPER_SETTING = {"fgsm": ["eps=1/255"], "corruptions": ["ref=alexnet", f"ref={APPROX_ALEXNET}"]}


def _default_setting(suite: str) -> str | None:
    """The setting a suite of the registry runs at by default, as its records name it ("eps=1/255"
    for fgsm: the paper's); None for a suite without settings or outside the registry."""
    from .suite import SUITES, fmt_setting  # here: suite.py imports this module

    defaults = SUITES[suite].defaults if suite in SUITES else None
    return fmt_setting(defaults) if defaults else None


def _off_default(suite: str, setting: str) -> bool:
    """A setting other than the suite's default (fgsm:eps=8/255): its column says so. No setting
    (a record added by hand) is taken as the default."""
    default = _default_setting(suite)
    return default is not None and bool(setting) and setting != default


def _partial_c(suite: str, setting: str) -> bool:
    """The mean accuracy over a partial ImageNet-C tree (no mCE: AlexNet's is over all 75 folders)."""
    return suite == "corruption_acc" and setting.startswith(PARTIAL_C)


def _relative_mce(suite: str, setting: str) -> bool:
    """An mCE normalised by a model of the report (the baseline), not by AlexNet."""
    return suite == "corruptions" and setting.startswith("ref=") and "alexnet" not in setting


@dataclass
class Record:
    """One number: ``value`` of ``metric`` ("acc", "mce", "match_rate"...) for ``model`` under ``suite``
    at ``setting`` (e.g. "eps=1/255", "fog@3", "" for none), with the seed of the run."""

    model: str
    seed: int
    suite: str
    setting: str
    metric: str
    value: float


def _records_of(d: dict) -> list:
    """A report dict's ``records`` list; NsvitError when it is absent or not a list."""
    records = d.get("records")
    if not isinstance(records, list):
        raise NsvitError("not an nsvit-fast report ('records' must be a JSON list)")
    return records


def _record(r: Any, i: int) -> Record:
    """Record ``i`` of a report file, after checking its fields (a hand-edited file loaded
    "value": "high" as a number)."""
    names = [f.name for f in fields(Record)]
    if not isinstance(r, dict) or sorted(r) != sorted(names):
        raise NsvitError(f"record {i} must be an object with the keys {', '.join(names)}")
    bad = next((k for k in ("model", "suite", "setting", "metric") if not isinstance(r[k], str)), None)
    if bad is not None:
        raise NsvitError(f"record {i}: {bad} must be a string, got {r[bad]!r}")
    if not isinstance(r["seed"], int) or isinstance(r["seed"], bool):
        raise NsvitError(f"record {i}: seed must be an integer, got {r['seed']!r}")
    v = r["value"]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise NsvitError(f"record {i}: value must be a finite number, got {v!r}")
    return Record(**r)


def _commit(stage: Path, out: Path, new: list[str], managed: tuple[str, ...]) -> None:
    """Move the files ``new`` from ``stage`` into ``out`` and remove the other ``managed`` files there
    (the old report's files the new one does not write), as one change as far as POSIX allows.

    Each old file is first hard-linked into ``stage/old`` (copied where the filesystem has no hard
    links); if that fails nothing in ``out`` has changed yet. Each new file then replaces its old one
    by an atomic rename (a reader sees the old file or the new, never none), taking the old one's
    mode. If a move or a removal fails, the old files are renamed back and the new ones removed
    before the error (NsvitError) is raised; so too on an interruption (SIGTERM, Ctrl-C) between
    moves. A kill -9 or a power cut in the middle of the moves (POSIX has no rename of several names
    at once) leaves ``stage/journal.json``, written before the first move: the next save into
    ``out`` puts the old report back from it (:func:`_recover`)."""
    backup = stage / "old"
    try:
        backup.mkdir()
        olds = [n for n in managed if os.path.lexists(out / n)]
        for n in olds:
            try:
                os.link(out / n, backup / n, follow_symlinks=False)
            except (OSError, NotImplementedError):  # no hard links here (FAT, some network filesystems)
                shutil.copy2(out / n, backup / n, follow_symlinks=False)
        _write_synced(stage / JOURNAL, json.dumps({"olds": olds, "new": list(new)}))
        _sync_dir(backup)  # the backups and the journal on disk before the first move
        _sync_dir(stage)
    except OSError as e:
        raise NsvitError(f"cannot write the report in {out}: {e.strerror or e} "
                         f"(nothing in {out} was changed)") from None
    moved: list[str] = []
    try:
        for n in new:
            if n in olds and not (out / n).is_symlink():
                with contextlib.suppress(OSError):  # keep the mode the user gave the file (as atomic_path does)
                    os.chmod(stage / n, (out / n).stat().st_mode & 0o777)
            os.replace(stage / n, out / n)
            moved.append(n)
        for n in olds:
            if n not in new:  # a figure of the old report that this one does not draw
                os.unlink(out / n)
    except BaseException as e:  # a full disk, or SIGTERM / Ctrl-C between two moves: put the old report back
        undone = True
        for n in managed:
            try:
                if n in olds:
                    os.replace(backup / n, out / n)
                elif n in moved:
                    os.unlink(out / n)
            except OSError:
                undone = False
        if undone:
            with contextlib.suppress(OSError):
                os.unlink(stage / JOURNAL)
        if not isinstance(e, OSError):
            raise
        where = f"{out / Path(e.filename).name}: " if e.filename else f"{out}: "
        raise NsvitError(f"cannot write the report {where}{e.strerror or e} "
                         + (f"(the old report in {out} was put back)" if undone else
                            f"(the old report in {out} could not all be put back yet: the next save into it "
                            f"tries again)")) from None
    _sync_dir(out)  # the renames durable before the journal goes
    with contextlib.suppress(OSError):  # the new report is whole: nothing to put back (save retries)
        os.unlink(stage / JOURNAL)


JOURNAL = "journal.json"  # in a staging folder: the commit's plan, present only while files move
_LOCK = ".lock"  # in a staging folder: flock-ed by the save that owns it, released when it dies


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    fd = None
    with contextlib.suppress(OSError):  # not every filesystem allows it
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
    if fd is not None:
        os.close(fd)


def _remove_stage(stage: Path) -> None:
    """Remove a staging folder: its journal first (nothing left to put back), its lock last (a
    folder without one is never recovered, so a kill part-way must not leave it lockless)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stage / JOURNAL)
    _sync_dir(stage)
    for p in stage.iterdir() if stage.is_dir() else ():
        if p.name == _LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            os.unlink(p)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stage / _LOCK)
    stage.rmdir()


def _recover(out: Path, managed: tuple[str, ...]) -> list[Path]:
    """Finish what killed saves left in ``out``: each staging folder whose owner is gone (its lock is
    free) is removed, and where its journal shows that files had moved, the old report's files are
    put back first, so the folder holds the report from before that save, whole (also a save killed
    after its last move: it never returned). A staging folder whose owner still runs is left alone.
    Each step can be done twice, so a recovery that is itself killed is finished by the next.
    Returns the staging folders whose moves were undone."""
    undone = []
    for stage in sorted(out.glob(".nsvit-report.*.tmp")):
        try:
            fd = os.open(stage / _LOCK, os.O_RDWR)
        except OSError:  # not a staging folder of this version, or its save is just starting
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its save is running
                continue
            if os.fstat(fd).st_nlink == 0:  # removed by another recovery before we locked it
                continue
            try:
                plan = json.loads((stage / JOURNAL).read_text())
                olds = [n for n in plan["olds"] if n in managed]  # names only: a journal edited by hand
                new = [n for n in plan["new"] if n in managed]   # reaches no other path
            except (OSError, ValueError, TypeError, KeyError):  # none, or cut short: no move had begun
                olds = new = []
            changed = False
            for n in new:
                if (stage / n).exists():  # not moved yet
                    continue
                with contextlib.suppress(FileNotFoundError):  # already put back
                    if n in olds:
                        os.replace(stage / "old" / n, out / n)
                    else:
                        os.unlink(out / n)
                    changed = True
            for n in olds:  # an old figure the killed save had removed
                if not os.path.lexists(out / n):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(stage / "old" / n, out / n)
                        changed = True
            _sync_dir(out)
            with contextlib.suppress(OSError):
                _remove_stage(stage)
            if changed:
                undone.append(stage)
        finally:
            os.close(fd)
    return undone


def _new_stage(out: Path) -> tuple[Path, int | None]:
    """A staging folder in ``out`` and the descriptor holding its lock (None where the filesystem has
    no flock: its stages are then never recovered, only skipped)."""
    for _ in range(5):
        stage = Path(tempfile.mkdtemp(prefix=".nsvit-report.", suffix=".tmp", dir=out))
        try:
            fd = os.open(stage / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another save's recovery holds it
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                return stage, None
            shutil.rmtree(stage, ignore_errors=True)
            raise
        try:  # that recovery saw a free lock and no journal, and removed the folder: take another
            same = os.stat(stage / _LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return stage, fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "its staging folders were removed as they were made", str(out))


def merge_context(a: dict, b: dict) -> dict:
    """Two reports' contexts, merged: one when they are equal (seeds of one evaluation), else both
    kept, as ``{"merged": [...]}`` (other weights or data: one context would misname the rows)."""
    if not a or not b or a == b:
        return dict(a or b)
    parts = [*a.get("merged", [a]), *b.get("merged", [b])]
    return {"merged": [p for i, p in enumerate(parts) if p not in parts[:i]]}


class Report:
    """Every number of an evaluation as Records; aggregates them over seeds and renders Table 2,
    CSV, JSON and plots. ``evaluate`` returns one; ``Report.load`` reads a saved one back."""

    def __init__(self, records: list[Record] | None = None, context: dict | None = None):
        self.records: list[Record] = []
        self._keys: set[tuple] = set()
        # what the numbers were computed on: data, image count, each model's weights (and file)
        self.context: dict = dict(context or {})
        for r in records or []:
            self._append(r)

    def _append(self, r: Record) -> None:
        # one value per (model, seed, suite, setting, metric): a second would count as another seed
        # in the mean ± std (--seeds 0,0 gave n = 2 from one run)
        key = (r.model, r.seed, r.suite, r.setting, r.metric)
        if key in self._keys:
            raise NsvitError(f"the report already holds {r.model} at seed {r.seed} on {r.suite}"
                             f"{' ' + r.setting if r.setting else ''} ({r.metric}): each model, seed and "
                             f"setting is recorded once")
        self._keys.add(key)
        self.records.append(r)

    def add(self, model: str, seed: int, suite: str, setting: str, metric: str, value: float) -> None:
        """Append one Record (seed cast to int, value to float). Raises NsvitError when the report
        already holds that model, seed, suite, setting and metric."""
        self._append(Record(model, int(seed), suite, setting, metric, float(value)))

    def merge(self, other: "Report") -> "Report":
        """A new Report with this one's records, then ``other``'s (e.g. runs of other seeds). Raises
        NsvitError where both hold the same model, seed, suite, setting and metric."""
        return Report(self.records + other.records, merge_context(self.context, other.context))

    @property
    def models(self) -> list[str]:
        """Model names in the order they first appear."""
        return list(dict.fromkeys(r.model for r in self.records))

    # -- aggregation --
    def values(self, model: str, suite: str, setting: str | None = None, metric: str | None = None) -> list[float]:
        """The values (one per seed and setting) of ``model`` on ``suite``; ``metric`` defaults to the
        suite's headline (mCE for corruptions, match rate for the nullspace suites, else accuracy),
        ``setting`` None takes every setting. Empty when there are none."""
        metric = metric or HEADLINE.get(suite, "acc")
        return [r.value for r in self.records if r.model == model and r.suite == suite and r.metric == metric
                and (setting is None or r.setting == setting)]

    def columns(self) -> list[tuple[str, str, str]]:
        """(suite, setting, label) of every headline column: Table 2's first, then the extras, then
        suites registered by the user (labelled by their name), in the order they were run."""
        heads = list(dict.fromkeys((r.suite, r.setting) for r in self.records
                                   if r.metric == HEADLINE.get(r.suite, "acc") and "@" not in r.setting))
        order = [s for s, _ in TABLE2 + EXTRA]
        own = list(dict.fromkeys(s for s, _ in heads if s not in order))
        order += own
        heads.sort(key=lambda h: order.index(h[0]))
        multi = {s for s, _ in heads if sum(1 for t, _ in heads if t == s) > 1}
        # a suite at several settings, or at one other than its default, shows it: "FGSM" is eps=1/255 only
        return [(s, st, f"C↓ (vs {st[4:]})" if _relative_mce(s, st) else
                 f"C acc (ImageNet-C, partial {st[len(PARTIAL_C):]})" if _partial_c(s, st) else
                 LABELS.get(s, s) + (f" ({st})" if st and (s in multi or _off_default(s, st)) else ""))
                for s, st in heads]

    def cell(self, model: str, suite: str, setting: str) -> tuple[float, float, int] | None:
        """(mean, std over seeds (0 for one), count) of the headline values, or None when there are none."""
        v = self.values(model, suite, setting)
        if not v:
            return None
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)

    def average(self, model: str) -> float | None:
        """The paper's Average over the Table-2 columns present, C as 100 - mCE, each at the paper's
        setting: a column at another (fgsm:eps=8/255, cw:steps=10) is left out (:meth:`left_out`).
        Where the mCE ran at several references it takes AlexNet's (``PAPER_SETTING``), else the
        first; a baseline-relative mCE enters as it is (the note says so)."""
        vals = []
        settings: dict[str, list[str]] = {}
        for suite, setting, _ in self._average_columns():
            if self.cell(model, suite, setting) is not None:
                settings.setdefault(suite, []).append(setting)
        for suite, present in settings.items():
            setting = next((p for p in PAPER_SETTING.get(suite, []) if p in present), present[0])
            c = self.cell(model, suite, setting)
            vals.append(100.0 - c[0] if suite in LOWER_IS_BETTER else c[0])
        return statistics.mean(vals) if vals else None

    def _average_columns(self) -> list[tuple[str, str, str]]:
        """The Table-2 columns at the paper's settings: those the Average takes."""
        return [c for c in self.columns() if c[0] in dict(TABLE2) and not _off_default(c[0], c[1])]

    def left_out(self) -> list[str]:
        """Labels of the Table-2 columns the Average leaves out: run at another setting than the paper's."""
        return [lab for s, st, lab in self.columns() if s in dict(TABLE2) and _off_default(s, st)]

    # -- rendering --
    def table2(self) -> str:
        """Markdown table in the paper's Table 2 layout (models as rows, mean ± std over seeds, the
        Average) and a note naming the seeds. Raises NsvitError when the report is empty."""
        cols = self.columns()
        if not cols:
            raise NsvitError("the report holds no results")
        head = "| model | " + " | ".join(lab for _, _, lab in cols) + " | Average |"
        lines = [head, "|---|" + "---|" * (len(cols) + 1)]
        for m in self.models:
            cells = []
            for suite, setting, _ in cols:
                c = self.cell(m, suite, setting)
                cells.append("–" if c is None else f"{c[0]:.2f}" + (f" ± {c[1]:.2f}" if c[2] > 1 else ""))
            avg = self.average(m)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {'–' if avg is None else f'{avg:.2f}'} |")
        seeds = sorted({r.seed for r in self.records})
        note = "Accuracy in %" + (", C↓ is mCE (lower is better; the Average uses 100 − mCE)"
                                  if any(s == "corruptions" for s, _, _ in cols) else "") + f". Seeds: {seeds}"
        note += "; mean ± std over seeds." if len(seeds) > 1 else "."
        off = self.left_out()
        if off:
            note += (f" The Average leaves out {', '.join(off)}: not the paper's setting.")
        relative = sorted({r.setting[4:] for r in self.records if _relative_mce(r.suite, r.setting)})
        if relative:
            note += (f" C↓ (vs {', '.join(relative)}) is mCE relative to that model's corruption errors (it "
                     f"scores 100), not the paper's AlexNet-normalised mCE, so that Average compares these "
                     f"rows only, not the paper's.")
        partial = sorted({r.setting[len(PARTIAL_C):] for r in self.records if _partial_c(r.suite, r.setting)})
        if partial:
            note += (f" C acc (ImageNet-C, partial {', '.join(partial)}) is the mean accuracy over the "
                     f"<corruption>/<severity> folders present: without all of them there is no mCE, so no C↓ "
                     f"enters the Average.")
        if any(r.setting == f"ref={APPROX_ALEXNET}" for r in self.records):
            note += (" mCE against AlexNet on on-the-fly corruptions is approximate (AlexNet's errors were "
                     "measured on the original ImageNet-C files); the imagenet-c suite on the pre-generated "
                     "folders gives the comparable number.")
        return "\n".join(lines) + "\n\n" + note + "\n"

    def context_line(self) -> str:
        """One paragraph for report.md: the data, its image count and each model's weights, from
        ``context`` (empty when there is none)."""
        c = self.context
        if not c:
            return ""
        parts = c.get("merged", [c])

        def one(c: dict) -> str:
            models = "; ".join(f"{name}: {m.get('checkpoint') or m.get('arch', '?')} (weights {m.get('weights', '?')})"
                               for name, m in c.get("models", {}).items())
            skipped = f" ({c['skipped']} unreadable skipped)" if c.get("skipped") else ""
            return f"Data: {c.get('data', '?')}, {c.get('images', '?')} images{skipped}. Models: {models}."

        if len(parts) == 1:
            return one(parts[0]) + "\n\n"
        return f"Merged from {len(parts)} evaluations:\n\n" + "\n".join(f"- {one(p)}" for p in parts) + "\n\n"

    def to_dict(self) -> dict:
        """JSON-ready dict: {"kind": "nsvit-fast/report", "records": [...]}."""
        d = {"kind": "nsvit-fast/report", "records": [asdict(r) for r in self.records]}
        if self.context:
            d["context"] = self.context
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """Inverse of to_dict. Raises NsvitError when ``d`` is not an nsvit-fast report."""
        if not isinstance(d, dict) or d.get("kind") != "nsvit-fast/report":
            raise NsvitError("not an nsvit-fast report")
        if not isinstance(d.get("context", {}), dict):
            raise NsvitError("not an nsvit-fast report ('context' must be a JSON object)")
        return cls([_record(r, i) for i, r in enumerate(_records_of(d))], d.get("context"))

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read a report.json. Raises NsvitError for a missing file, invalid JSON or another kind."""
        p = Path(path)
        if not p.is_file():
            raise NsvitError(f"no such report: {p}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise NsvitError(f"{p} is not valid JSON: {e}") from None
        except NsvitError as e:  # e.g. a record twice (edited by hand, or merged by an older version)
            raise NsvitError(f"{p}: {e}") from None

    def to_csv(self) -> str:
        """CSV text, one row per record: model, seed, suite, setting, metric, value (repr, exact)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["model", "seed", "suite", "setting", "metric", "value"])
        for r in self.records:
            w.writerow([r.model, r.seed, r.suite, r.setting, r.metric, repr(r.value)])
        return buf.getvalue()

    FILES = ("report.json", "report.csv", "report.md", "suites.png", "corruptions.png")  # what save may write

    @classmethod
    def check_folder(cls, out_dir: str | Path) -> None:
        """Refuse a folder whose report-named files (``FILES``) are not an nsvit-fast report's: a
        user's report.md or corruptions.png was replaced or deleted as "the old report". A folder
        with none of them, or with a report.json this class reads, is fine."""
        out = Path(out_dir)
        found = [n for n in cls.FILES if os.path.lexists(out / n) and not (out / n).is_dir()]
        if not found:
            return
        try:
            cls.load(out / "report.json")
        except NsvitError as e:
            if os.path.lexists(out / "report.json"):  # ours by name, but damaged or edited by hand
                raise NsvitError(f"{e}; not an evaluation report to replace: give eval its own folder") from None
            raise NsvitError(f"{out} holds {found[0]} but no nsvit-fast report.json beside it: it is not an "
                             f"evaluation report to replace; give eval its own folder") from None

    def save(self, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write report.json, report.csv, report.md (Table 2) and, with ``plots``, the figures into
        ``out_dir``; returns {kind: path}.

        The set of report files (``FILES``) replaces the one already in ``out_dir`` as a whole: every
        file is first written into a hidden staging folder inside ``out_dir`` (same filesystem, so
        each move is an atomic rename), and only when all are written are they moved into place and
        the old report's files the new one does not write (a figure) removed. A failure while writing
        (a full disk, a figure that cannot be drawn) leaves ``out_dir`` exactly as it was; a failure
        while moving puts the old files back, and a save killed while moving (kill -9) is undone by
        the next save into ``out_dir``, with a warning. Other files in ``out_dir`` are never touched. Raises
        NsvitError for a filesystem error (one line naming ``out_dir``), an empty report, or report
        files in ``out_dir`` that are not an nsvit-fast report's (:meth:`check_folder`)."""
        out = Path(out_dir)
        self.check_folder(out)
        for name in self.FILES:  # a folder where a file goes would fail the move, after others were moved
            if (out / name).is_dir() and not (out / name).is_symlink():
                raise NsvitError(f"cannot write {out / name}: it is a folder")
        made = []
        try:
            made = make_dirs(out)
            for old in _recover(out, self.FILES):
                warnings.warn(f"{out}: an earlier report save was killed while it moved its files "
                              f"({old.name}); the report from before it was put back, whole")
            stage, lock = _new_stage(out)
        except OSError as e:
            for p in reversed(made):  # a folder this call created goes again (when still empty)
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise os_error(out, e) from None
        done = False
        try:
            try:
                written = self._write_all(stage, plots)
            except NsvitError as e:  # name the report's path, not the staging folder that goes away
                raise NsvitError(f"{str(e).replace(str(stage), str(out))} (nothing in {out} was changed)") from None
            except OSError as e:
                raise NsvitError(f"cannot write the report in {out}: {e.strerror or e} "
                                 f"(nothing in {out} was changed)") from None
            _commit(stage, out, [p.name for p in written.values()], self.FILES)
            done = True
        finally:
            if done or not (stage / JOURNAL).exists():  # else the put-back failed: the next save finishes it
                with contextlib.suppress(OSError):
                    _remove_stage(stage)
            if lock is not None:
                os.close(lock)
            if not done:
                for p in reversed(made):  # a folder this call created goes again (when still empty)
                    with contextlib.suppress(OSError):
                        p.rmdir()
        return {k: out / p.name for k, p in written.items()}

    def _write_all(self, folder: Path, plots: bool) -> dict[str, Path]:
        """Write every report file into ``folder`` (the staging folder of ``save``)."""
        table = "# Robustness report\n\n" + self.context_line() + self.table2()  # an empty report fails here
        paths = {"json": write_json(folder / "report.json", self.to_dict()),
                 "csv": write_text(folder / "report.csv", self.to_csv()),
                 "md": write_text(folder / "report.md", table)}
        if plots:
            paths.update(self.plots(folder))
        return paths

    # -- plots --
    def plots(self, out: Path) -> dict[str, Path]:
        """Bar chart of accuracy per suite (suites.png) and accuracy per corruption severity
        (corruptions.png), those the records allow; returns {kind: path}."""
        from ..viz import bars_figure

        paths = {}
        cols = [(s, st, lab) for s, st, lab in self.columns() if s not in LOWER_IS_BETTER]
        if cols:
            rows = []
            for m in self.models:
                row = {"name": m}
                for s, st, lab in cols:
                    c = self.cell(m, s, st)
                    if c is not None:
                        row[lab], row[lab + "_std"] = c[0], c[1]
                rows.append(row)
            paths["bars"] = bars_figure(rows, [(lab, lab) for _, _, lab in cols], out / "suites.png",
                                        title="accuracy per suite (%)")
        sev = [r for r in self.records if r.suite == "corruptions" and r.metric == "acc" and "@" in r.setting]
        if sev:
            paths["corruptions"] = self._severity_plot(sev, out / "corruptions.png")
        return paths

    def _severity_plot(self, recs: list[Record], path: Path) -> Path:
        from ..viz import pyplot

        plt = pyplot()

        names = list(dict.fromkeys(r.setting.split("@")[0] for r in recs))
        cols = 5
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False, sharey=True)
        for ax, name in zip(axes.flat, names):
            for m in self.models:
                pts = {}
                for r in recs:
                    if r.model == m and r.setting.startswith(name + "@"):
                        pts.setdefault(int(r.setting.split("@")[1]), []).append(r.value)
                if pts:
                    xs = sorted(pts)
                    ax.plot(xs, [statistics.mean(pts[x]) for x in xs], marker="o", ms=3, label=m)
            ax.set_title(name, fontsize=8)
            ax.set_xticks([1, 2, 3, 4, 5])
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.supxlabel("severity", fontsize=8)
        fig.supylabel("accuracy (%)", fontsize=8)
        fig.tight_layout()
        out = save_figure(fig, path, dpi=100)
        plt.close(fig)
        return out

"""Atomic file writing and safetensors I/O: every writer in nsvit-fast goes through here.

A file is written to a temporary sibling and renamed over the target, so a kill at any moment
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import NsvitError


def os_error(path: str | os.PathLike, e: OSError, what: str = "write") -> NsvitError:
    """One line for a filesystem error: the path and the system's reason (no traceback)."""
    reason = e.strerror or str(e) or type(e).__name__
    return NsvitError(f"cannot {what} {path}: {reason}")


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] = (), what: str = "--out",
                      siblings: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output file path that cannot be written, before any work is done.

    Refused: a path that is a folder, a path under a file, a suffix not in ``suffixes`` (when given),
    one of a finetuning run's files (``runlock.RUN_FILES``) in a folder that holds that run,
    a folder that cannot be created or written, and a folder at any of ``siblings`` (the files
    written beside it, e.g. its .json). Nothing is left behind and nothing is
    made: writability is tried with a temporary file in the nearest existing folder."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise NsvitError(f"{what} {path} must end in {' or '.join(suffixes)} (that is the format written)")
    if path.is_dir():
        raise NsvitError(f"{what} {path} is a folder; give a file name")
    if path.is_symlink():  # the checks below are of the link's name, the write would land on its target
        raise NsvitError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); give the file's own path")
    if path.exists() and not path.is_file():  # the rename would put a file where the device or pipe was
        raise NsvitError(f"{what} {path} is not a regular file (a device, pipe or socket); give a file name")
    from .runlock import DEMO_FILES, LOCK_NAME, RUN_FIGURE, RUN_FILES

    if path.name in (*RUN_FILES, RUN_FIGURE, LOCK_NAME) and any((path.parent / f).exists() for f in RUN_FILES):
        # synth / pretrain had replaced a finetuning run's checkpoint or model: the run was lost
        raise NsvitError(f"{what} {path} is a file of the finetuning run in {path.parent}; write elsewhere")
    if path.name in DEMO_FILES and (path.parent / "demo.json").is_file():  # synth --log DEMO/report.md
        raise NsvitError(f"{what} {path} is a file of the demo in {path.parent}; write elsewhere")
    from .eval.report import Report

    if path.name in Report.FILES and (path.parent / "report.json").is_file():
        # synth --log REPORT/report.csv replaced one file of an evaluation report
        raise NsvitError(f"{what} {path} is a file of the evaluation report in {path.parent}; write elsewhere")
    _check_not_folders(what, siblings)
    _check_dir(path.parent, what, path)
    for p in (path, *map(Path, siblings)):
        _check_writable_file(p, what)
    return path


TMP_EXTRA = len("..") + 8 + len(".tmp")  # what atomic_path's temporary name adds to the file's


def _check_writable_file(path: Path, what: str) -> None:
    """A read-only file is not ours to replace (the rename went over it, root or not); a name too
    long for its temporary sibling (mkstemp's ".NAME.<8 characters>.tmp") failed only at the write,
    after the work."""
    with contextlib.suppress(OSError):
        if path.is_file() and not path.stat().st_mode & 0o222:
            raise NsvitError(f"{what}: {path} is read-only; make it writable or write elsewhere")
    existing = path.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if len(os.fsencode(path.name)) + TMP_EXTRA > _name_max(existing):
        raise os_error(path, OSError(errno.ENAMETOOLONG, "file name too long (with its temporary sibling's "
                                                         "14 extra characters)"))


def check_output_dir(path: str | os.PathLike, what: str = "--out", files: tuple[str, ...] = ()) -> Path:
    """Refuse an output folder that is a file, lies under a file, or cannot be created or written,
    or that holds a folder under one of ``files`` (the names the caller will write there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NsvitError(f"{what} {path} is a file, not a folder")
    _check_not_folders(what, [path / f for f in files])
    _check_dir(path, what)
    return path


def _real(p) -> Path:
    """The absolute path with links resolved, as far as they resolve (a loop stops there)."""
    try:
        return Path(p).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Path(os.path.abspath(p))


def check_distinct(outputs: Mapping[str, Any], inputs: Mapping[str, Any],
                   folders: Mapping[str, Any] | None = None, files: tuple[str, ...] = ()) -> None:
    """Refuse an output that is one of the inputs (the same file by any path: writing it would
    destroy the input before or while it is read), one inside an image folder of ``folders`` (it
    would be read as data: a folder output at or under its root, a file output in one of its class
    folders; ``files`` names the outputs that are files), or another output. ``outputs``,
    ``inputs`` and ``folders`` map a flag's name to its path; None values are skipped, and so are
    folders that are no folder."""
    def same(a, b) -> bool:
        try:
            return os.path.samefile(a, b)
        except OSError:  # not both there yet
            return _real(a) == _real(b)

    outs = [(k, v) for k, v in outputs.items() if v is not None]
    ins = [(k, v) for k, v in inputs.items() if v is not None]
    for i, (k, p) in enumerate(outs):
        for k2, q in ins:
            if same(p, q):
                raise NsvitError(f"{k} {p} is also {k2}: writing it would destroy that input; give another path")
        for k2, q in (folders or {}).items():  # a run's figures under it became samples of a class
            if q is None or not Path(q).is_dir():
                continue
            root, here = _real(q), _real(p)
            # a folder output at the root becomes a class; a file there is not read (only folders are)
            inside = root in here.parents if k in files else root == here or root in here.parents
            if inside and not (k in files and here.parent == root):
                raise NsvitError(f"{k} {p} is inside {k2} {q}: what is written there would be read as its "
                                 f"data; write elsewhere")
        for k2, q in outs[i + 1:]:
            if same(p, q):
                raise NsvitError(f"{k} and {k2} are one file ({p}); give each its own path")


def _check_not_folders(what: str, paths) -> None:
    """A folder where a file will be written fails at the write, after the others were written: refuse it first."""
    for p in paths:
        if Path(p).is_dir():
            raise NsvitError(f"{what}: {p} is a folder, where this command writes a file")


def _check_dir(folder: Path, what: str, given: Path | None = None) -> None:
    """``folder`` can be made and written (``given``: the path the user gave, named in the refusal)."""
    folder = Path(folder) if str(folder) else Path(".")
    existing = folder
    while not existing.exists():  # the nearest existing ancestor decides
        if existing.is_symlink():  # mkdir would fail there, after the run
            raise NsvitError(f"cannot write {folder}: {existing} is a link to a missing path")
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NsvitError(f"{what} {given or folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NsvitError(f"cannot write {folder}: {existing} is not writable")
    # os.access trusts root: write a real file where the folder would be made. The missing part is
    # not made and removed as a trial, since two ranks (or two runs) checking the same new folder
    # would remove it under each other's feet.
    try:
        fd, tmp = tempfile.mkstemp(prefix=".nsvit-write-check.", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise os_error(folder, e) from None
    if existing != folder:
        missing = folder.relative_to(existing).parts if folder.is_relative_to(existing) else ()
        limit = _name_max(existing)
        for part in missing:
            if len(os.fsencode(part)) > limit:
                raise os_error(folder, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)))


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no limit reported
        return 255


class _Staging(threading.local):
    pending: list[tuple[Path, Path]] | None = None  # (temporary, target) held back by staged_writes


_staging = _Staging()


@contextlib.contextmanager
def staged_writes() -> Iterator[None]:
    """Hold back every file written inside the block (through :func:`atomic_path`, or
    :func:`commit` for a file written as it goes) as its temporary sibling, and rename them all into
    place only when the block ends without an error. On an error or an interruption (Ctrl-C) the
    temporary files are removed and no target changes: a command that writes several files (an
    image, its JSON, its figure) leaves all of them new or all as they were (the renames at the end
    take microseconds; a kill -9 among them can still mix the two). Nested blocks join the outer
    one. Also a decorator. Inside the block a written file reads back as its old content."""
    if _staging.pending is not None:
        yield
        return
    _staging.pending = []
    ok = False
    try:
        yield
        ok = True
    finally:
        pending, _staging.pending = _staging.pending, None
        done = 0
        try:
            if ok:
                for tmp, path in pending:
                    try:
                        os.replace(tmp, path)
                    except OSError as e:
                        raise os_error(path, e) from None
                    done += 1
        finally:
            for tmp, _ in pending[done:]:
                with contextlib.suppress(OSError):
                    tmp.unlink()


def commit(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file over ``path`` now, or at the end of the enclosing
    :func:`staged_writes` block. Raises OSError as ``os.replace``."""
    if _staging.pending is not None:
        _staging.pending.append((Path(tmp), Path(path)))
    else:
        os.replace(tmp, path)


def link_target(path: str | os.PathLike) -> Path:
    """The file a symbolic link points to (``path`` itself when it is none): a write replaces the
    target and keeps the link (the rename had put a plain file where the link was)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (next to its target, for a symbolic link); on success
    rename it over ``path``.

    The caller writes the whole file to the yielded path. On an exception the temporary file
    is removed and ``path`` is untouched. A filesystem error (read-only folder, full disk, a
    folder, device or pipe where the file should be) raises NsvitError naming ``path``.
    """
    path = link_target(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise NsvitError(f"cannot write {path}: it is a folder")
        if path.exists() and not path.is_file():
            raise NsvitError(f"cannot write {path}: it is not a regular file (a device, pipe or socket)")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        yield tmp
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~current_umask())
        commit(tmp, path)
        tmp = None  # renamed, or staged_writes' to rename
    except OSError as e:
        raise os_error(path, e) from None
    except Exception as e:  # safetensors reports a failed write (full disk) as its own error type
        if type(e).__name__ == "SafetensorError":
            raise NsvitError(f"cannot write {path}: {str(e).splitlines()[0] if str(e) else 'write failed'}") from None
        raise
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process umask. Read from /proc where there is one: setting it to read it back would give
    a file another thread creates in between the mode 0666."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(folder: str | os.PathLike) -> list[Path]:
    """``mkdir -p folder``; returns the folders this call made, outermost first (for the caller to
    remove again when it fails). A folder another process makes meanwhile is not counted, and one it
    removes meanwhile (its own failed call) is made again. Raises OSError."""
    folder = Path(folder)
    made: list[Path] = []
    tries = 10  # each retry follows another run's removal of a parent it made: a handful at most
    for attempt in range(tries):
        try:
            for p in reversed([folder, *folder.parents]):
                if p.is_dir():
                    continue
                try:
                    p.mkdir()
                except FileExistsError:
                    try:  # one stat: exists() then is_dir() could see another run remove it in between
                        st = os.stat(p)
                    except FileNotFoundError:
                        if os.path.islink(p):
                            raise NotADirectoryError(errno.ENOTDIR, "a link to a missing path", str(p)) from None
                        continue  # gone again: the next level's mkdir fails, and we start again
                    if not stat.S_ISDIR(st.st_mode):  # a file: a real error
                        raise
                    continue
                made.append(p)
            return list(dict.fromkeys(p for p in made if p.is_dir()))  # a folder made again counts once
        except FileNotFoundError:  # a parent went between our steps: start again from the top
            if attempt == tries - 1:
                raise
    return []


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`); returns the path. Missing parent
    folders are made. Raises NsvitError as :func:`atomic_path` does."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / inf float replaced by None: JSON has no such numbers, and Python's
    ``NaN`` / ``Infinity`` tokens break other readers (e.g. the PSNR of two identical images)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """``json.dumps`` of ``obj`` after :func:`json_safe`: valid JSON for any reader (no NaN tokens)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as indented JSON plus a newline, atomically; NaN / inf become null
    (:func:`json_safe`). Returns the path. Raises NsvitError as :func:`atomic_path` does, TypeError
    for an object JSON cannot hold."""
    return write_text(path, dumps(obj, indent=indent) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. Raises NsvitError as
    :func:`atomic_path` does."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure atomically (format from the suffix of ``path``)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors, atomically.

    ``metadata`` values that are not strings are stored as JSON (safetensors only takes strings);
    :func:`load_tensors` decodes them back.
    """
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else "json:" + json.dumps(v) for k, v in (metadata or {}).items()}
    seen: set[int] = set()  # safetensors refuses shared storage: copy any tensor seen before
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    tensors = out
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file: (tensors on CPU, decoded metadata). Unreadable files raise NsvitError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NsvitError(f"{path} is a folder, not a file" if path.is_dir() else
                         f"{path} is not a regular file (a pipe, device or socket)" if path.exists() else
                         f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise NsvitError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    decoded = {}
    for k, v in meta.items():
        try:
            decoded[k] = json.loads(v[5:]) if v.startswith("json:") else v
        except ValueError:
            raise NsvitError(f"{path}: metadata {k!r} is not valid JSON (edited or corrupt file)") from None
    return tensors, decoded


__all__ = ["os_error", "check_output_file", "check_output_dir", "atomic_path", "write_text", "write_json",
           "write_bytes", "save_figure", "save_tensors", "load_tensors"]

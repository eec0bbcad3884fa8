"""One run per folder: an exclusive ``fcntl.flock`` on ``<folder>/.nsvit.lock`` for the whole run.

The kernel drops a flock when its process dies (kill -9 included), so a lock left by a killed
run never blocks ``--resume``: the file may remain, the lock does not. A second run on a folder
in use fails at once with one line naming the running one (its pid, host and start time, which
the holder writes into the lock file). The lock file is removed when the run ends; a folder that
the lock itself created and that is still empty then (the run failed before writing anything) is
removed too, so a refused run leaves nothing behind.

One writer per output file (:func:`output_lock`): the same lock on ``.<name>.nsvit-lock`` beside
each file a command writes by name (a noise bank, its log, a watermarked PNG).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import time
from pathlib import Path
from typing import Iterator, Mapping

from .errors import NsvitError
from .io import make_dirs

LOCK_NAME = ".nsvit.lock"
# what a finetuning run leaves in its folder (its checkpoint first): no other run writes there
RUN_FILES = ("checkpoint.safetensors", "config.json", "log.jsonl", "model.safetensors", "model_ema.safetensors")
RUN_FIGURE = "fig4_trend.png"  # written by the run each round: not another command's to replace
DEMO_FILES = ("demo.json", "report.md", "fig2_nullspace_noise.png", RUN_FIGURE)  # a demo's folder: demo.json beside
_HELD: set[int] = set()  # lock fds this process holds


def _close_in_child() -> None:
    # a forked child (a DataLoader worker) inherits the lock's fd; it must not keep the lock alive
    # after its parent is killed, so it closes its copy (the parent's lock stays held)
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def holder(folder: str | os.PathLike) -> str:
    """What the lock file says about the run holding it ("pid 123 on host since ..."), or ''."""
    return _holder(Path(folder) / LOCK_NAME)


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip()
    except OSError:
        return ""


def check_not_a_run(folder: str | os.PathLike, what: str = "--out") -> None:
    """Refuse ``folder`` if a finetuning run lives there (one of RUN_FILES): its files are not
    another command's to write beside or over."""
    found = [f for f in RUN_FILES if (Path(folder) / f).exists()]
    if found:
        raise NsvitError(f"{what} {folder} holds a finetuning run ({found[0]}); give this command its own folder")


@contextlib.contextmanager
def _hold(folder: Path, name: str, busy: str) -> Iterator[Path]:
    """Hold an exclusive flock on ``folder / name`` (the folder made if missing) for the block. A
    lock taken: "{busy} (pid ... on host since ...)" as one NsvitError line. At the end the lock
    file goes, and so do the folders this call made that are still empty."""
    try:
        made = make_dirs(folder)
    except OSError as e:
        raise NsvitError(f"cannot create folder {folder}: {e.strerror or e}") from None
    path = folder / name
    fd = -1
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise NsvitError(f"cannot create the run lock {path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise NsvitError(f"cannot lock {path}: {e.strerror or e}") from None
                os.close(fd)
                fd = -1
                raise NsvitError(busy.format(who=_holder(path) or "another process")) from None
            try:  # the holder before us may have removed the file between our open and our lock
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = -1
        _HELD.add(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield folder
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(path)  # still holding the lock: a waiter re-checks the inode
            _HELD.discard(fd)
            os.close(fd)
        for p in reversed(made):  # folders this lock created and nothing else filled
            with contextlib.suppress(OSError):
                p.rmdir()


def run_lock(folder: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Hold the run lock of ``folder`` (created if missing) for the duration of the block.

    Raises:
        NsvitError: the folder is in use by another run, or the lock file cannot be created.
    """
    return _hold(Path(folder), LOCK_NAME, f"{folder} is in use by another nsvit-fast run ({{who}}); wait for it "
                                          f"to end or use another --out")


def _file_lock_name(name: str) -> str:
    return f".{name}.nsvit-lock"  # shorter than atomic_path's temporary name, which was checked to fit


def _stale_temps(path: Path, since: float | None = None) -> list[Path]:
    """atomic_path's and the synth log's temporaries for ``path``: "." + name + "." + 8 random
    characters + ".tmp", mode 0600 (mkstemp's; a user's file by that pattern has its own mode), ours.
    ``since``: only those modified after it (at exit: this run's), else only those untouched for a
    minute (at entry: a writer that takes no lock, the Python API, may be writing one now)."""
    head, n = f".{path.name}.", len(path.name) + 2 + 8 + 4
    now = time.time()
    try:
        names = [p for p in path.parent.iterdir()
                 if p.name.startswith(head) and p.name.endswith(".tmp") and len(p.name) == n]
    except OSError:  # an unreadable folder: nothing of ours to find there
        return []
    out = []
    for p in names:
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:  # gone meanwhile (its writer renamed it)
            continue
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.getuid():
            continue
        if (st.st_mtime >= since) if since is not None else (now - st.st_mtime > 60):
            out.append(p)
    return out


@contextlib.contextmanager
def output_lock(paths: Mapping[str, str | os.PathLike | None]) -> Iterator[None]:
    """One writer per output file: hold a lock beside each of ``paths`` ({flag: path}; None
    skipped) for the block, so that a second command writing one of them is refused at once in one
    line instead of the two runs' files ending up mixed (a bank of one run beside the log of the
    other). Holding it, the temporary files left for those names are removed, on entry (a run
    killed with -9) and on exit (a Ctrl-C that came between a temporary's creation and the code
    that removes it): no other process writes them meanwhile. Parent folders it makes and the
    command leaves empty (it failed) are removed.

    Raises:
        NsvitError: another run writes one of the files, or a lock cannot be created.
    """
    def sweep(since: float | None = None) -> None:
        for path in held:
            for t in _stale_temps(path, since):
                with contextlib.suppress(OSError):
                    t.unlink()

    held: list[Path] = []
    with contextlib.ExitStack() as stack:
        for what, p in paths.items():
            if p is None or str(p) == "":
                continue
            path = Path(os.path.abspath(p))
            if path in held:
                continue
            stack.enter_context(_hold(path.parent, _file_lock_name(path.name),
                                      f"{what} {p} is being written by another nsvit-fast run ({{who}}); wait for it "
                                      f"to end or choose another name"))
            held.append(path)
        sweep()
        start = time.time() - 0.05  # file times come from a coarser clock, a few ms behind
        try:
            yield
        finally:
            sweep(since=start)


__all__ = ["LOCK_NAME", "RUN_FIGURE", "RUN_FILES", "check_not_a_run", "holder", "output_lock", "run_lock"]

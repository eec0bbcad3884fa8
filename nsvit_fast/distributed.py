"""torchrun / DistributedDataParallel helpers (gloo on the CPU, nccl on CUDA).

Each rank takes ``idx[rank::world]`` of every global batch, so W processes see exactly the batches
of a single-process run, and averaging the per-rank means (DDP's gradient all-reduce) gives the
single-process gradient. Noise synthesis all-reduces its noise gradient and stop statistic the
same way (see synth.engine), so every rank holds the same noise.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes) in the default process group; (0, 1) when
    torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1), or by hand with RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT set in each process; True if distributed. Ranks started
    by hand wait at most NSVIT_JOIN_TIMEOUT seconds (600) for each other.

    The backend follows the run's device, not the machine: nccl (each rank on its LOCAL_RANK GPU)
    when ``device`` is CUDA, gloo when it is the CPU, even on a machine that has GPUs. ``None``
    keeps the old rule (nccl when CUDA exists)."""
    from .errors import NsvitError, env_int

    world = env_int("WORLD_SIZE", 1)
    if world < 1:
        raise NsvitError(f"WORLD_SIZE={world} must be >= 1 (torchrun sets it to the number of processes)")
    if world > 1:  # a rank outside [0, WORLD_SIZE) would wait for the others until the group's timeout (30 min)
        for var in ("RANK", "LOCAL_RANK"):
            if var in os.environ and not 0 <= env_int(var, 0) < world:
                why = f"{var}={os.environ[var]} is outside [0, WORLD_SIZE={world})"
                if var == "RANK" and not os.environ.get("TORCHELASTIC_RUN_ID"):
                    _tell_rank0(f"{why}: give each process its own RANK in [0, {world})")
                raise NsvitError(f"{why}: start distributed runs with torchrun, which sets them")
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:  # WORLD_SIZE set by hand, not by torchrun: init_process_group would raise a bare ValueError
        raise NsvitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start "
                         f"distributed runs with torchrun (torchrun --nproc-per-node N -m nsvit_fast finetune ...), "
                         f"or unset WORLD_SIZE")
    port = env_int("MASTER_PORT", 0)  # init_process_group would raise a bare ValueError
    if not 0 < port < 65536:
        raise NsvitError(f"MASTER_PORT={os.environ['MASTER_PORT']} must be a port in 1-65535")
    import socket

    addr = os.environ["MASTER_ADDR"]
    try:  # torch retries a name that does not resolve until the group's timeout (30 min), silently
        socket.getaddrinfo(addr, port)
    except (socket.gaierror, UnicodeError) as e:
        raise NsvitError(f"MASTER_ADDR={addr} does not resolve ({getattr(e, 'strerror', None) or e}): give the "
                         f"host name or IP address of rank 0's machine") from None
    if device is None:
        cuda = torch.cuda.is_available()
    else:
        cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(env_int("LOCAL_RANK", 0))
    backend = "nccl" if cuda else "gloo"
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun: its agent has gathered the ranks already
        dist.init_process_group(backend)
    else:
        _join_by_hand(addr, port, env_int("RANK", 0), world, backend)
    return True


JOIN_TIMEOUT = 600  # seconds; torchrun's own default rendezvous join_timeout
_JOINED = "nsvit/joined"  # store keys: how many ranks have arrived; rank 0's WORLD_SIZE; why a rank refused
_WORLD = "nsvit/world"
_REFUSED = "nsvit/refused"


def _join_by_hand(addr: str, port: int, rank: int, world: int, backend: str) -> None:
    """Start the process group of ranks started by hand (srun, a script), not by torchrun.

    torch's env:// rendezvous waits the process group's whole timeout (30 min) for a rank that never
    comes, inside C++, where SIGTERM and Ctrl-C are not acted on. Here each rank waits at most
    NSVIT_JOIN_TIMEOUT seconds (default 600, as torchrun) for the others, in Python loops that a
    signal ends at once: ranks other than 0 knock on rank 0's port with plain connects, then every
    rank counts itself in a store key and polls it. The store then gets the group's usual timeout,
    so collectives still wait as long as torch lets them.

    Raises:
        NsvitError: the others did not join in time, or MASTER_PORT is taken on rank 0's machine."""
    import socket
    import time

    from .errors import NsvitError, env_int

    join = env_int("NSVIT_JOIN_TIMEOUT", JOIN_TIMEOUT)
    if join < 1:
        raise NsvitError(f"NSVIT_JOIN_TIMEOUT={os.environ['NSVIT_JOIN_TIMEOUT']} must be >= 1 (seconds the ranks "
                         f"wait for each other; default {JOIN_TIMEOUT})")
    hint = (f"start all {world} ranks with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or start them with "
            f"torchrun (NSVIT_JOIN_TIMEOUT={join} s is how long they wait for each other)")
    deadline = time.monotonic() + join
    if rank != 0:
        while True:
            try:
                socket.create_connection((addr, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise NsvitError(f"rank {rank}: rank 0 did not open {addr}:{port} within {join} s: {hint}") from None
                time.sleep(0.5)
    dist_error = getattr(dist, "DistError", RuntimeError)  # torch < 2.2 raises plain RuntimeErrors
    with quiet_cpp_logs():  # the store's C++ backtraces, while the ranks meet; not init_process_group's
        store = _meet(addr, port, rank, world, join, hint, deadline, dist_error)
    from torch.distributed import constants

    store.set_timeout(constants.default_pg_nccl_timeout if backend == "nccl" else constants.default_pg_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def _meet(addr: str, port: int, rank: int, world: int, join: int, hint: str, deadline: float, dist_error):
    """The store of :func:`_join_by_hand`, once every rank has counted itself in."""
    import time

    from .errors import NsvitError

    try:
        store = _store(addr, port, world, rank == 0, max(1.0, deadline - time.monotonic()))
        if store is None:
            raise NsvitError(f"rank {rank}: something answers at {addr}:{port} but not as rank 0 of a run within "
                             f"{join} s (another program on MASTER_PORT?): {hint}")
    except dist_error as e:
        text = str(e)
        why = text.splitlines()[0] if text else type(e).__name__
        if rank == 0 and ("eaddrinuse" in text.lower() or "address already in use" in text.lower()):
            raise NsvitError(f"MASTER_PORT={port} is in use on rank 0's machine (another run's rank 0?): give a "
                             f"free port to every rank") from None
        if rank == 0:
            raise NsvitError(f"rank 0 could not listen on MASTER_PORT={port} ({why})") from None
        raise NsvitError(f"rank {rank}: could not reach rank 0 at {addr}:{port} ({why}): {hint}") from None

    def wait(done) -> None:
        while not done():
            if store.check([_REFUSED]):  # another rank found the group's settings wrong
                raise NsvitError(f"rank {rank}: {store.get(_REFUSED).decode()}")
            if time.monotonic() >= deadline:
                raise NsvitError(f"rank {rank}: {store.add(_JOINED, 0)} of {world} ranks joined at {addr}:{port} "
                                 f"within {join} s: {hint}")
            time.sleep(0.2)

    counted: list[str] = []
    try:
        if rank == 0:
            store.set(_WORLD, str(world))
        wait(lambda: store.check([_WORLD]))
        if int(store.get(_WORLD)) != world:  # it would wait for ranks that never come, or start without some
            why = f"rank {rank} was started with WORLD_SIZE={world}, rank 0 with {int(store.get(_WORLD))}"
            store.set(_REFUSED, f"{why}: give every rank the same WORLD_SIZE")
            raise NsvitError(f"{why}: give every rank the same WORLD_SIZE")
        counted.append(f"{_JOINED}/{rank}")
        if store.add(counted[-1], 1) > 1:  # a launch script's slip: the others stop too
            why = f"RANK={rank} was started twice: give each process its own RANK in [0, {world})"
            store.set(_REFUSED, why)
            raise NsvitError(why)
        counted.append(_JOINED)
        store.add(_JOINED, 1)
        wait(lambda: store.add(_JOINED, 0) >= world)
    except BaseException as e:  # NsvitError, Ctrl-C, SIGTERM: a rank that leaves is no longer counted,
        for key in counted:     # so the others do not start without it (and it may be started again)
            with contextlib.suppress(Exception):
                store.add(key, -1)
        if rank == 0 and not isinstance(e, dist_error):  # the store goes with rank 0: tell the others why,
            with contextlib.suppress(Exception):         # and give them a moment to read it and leave
                if not store.check([_REFUSED]):
                    store.set(_REFUSED, f"rank 0 stopped while the ranks joined ({_one_line(e)})")
                until = time.monotonic() + 2.0
                while store.add(_JOINED, 0) > 0 and time.monotonic() < until:
                    time.sleep(0.05)
        if isinstance(e, dist_error):
            text = str(e)
            why = text.splitlines()[0] if text else type(e).__name__
            raise NsvitError(f"rank {rank}: lost rank 0 at {addr}:{port} while the ranks joined ({why}): "
                             f"{hint}") from None
        raise
    return store


def _store(addr: str, port: int, world: int | None, is_master: bool, seconds: float):
    """A TCPStore (rank 0's server, or a client of it), or None when a client is not through in
    ``seconds``. torch's client ignores its timeout when something at the port accepts and never
    answers (another program on MASTER_PORT): it waits inside C++, where signals are not acted on,
    until that program closes the connection. So the client is opened in a daemon thread (the call
    releases the GIL) and waited for in a Python loop; a thread left behind dies with the process."""
    import threading
    import time
    from datetime import timedelta

    def open_store():
        return dist.TCPStore(addr, port, world_size=world, is_master=is_master, timeout=timedelta(seconds=seconds),
                             wait_for_workers=False)

    if is_master:
        return open_store()  # listens and returns
    box: dict = {}

    def run():
        try:
            box["store"] = open_store()
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = e

    t = threading.Thread(target=run, name="nsvit-store-client", daemon=True)
    t.start()
    until = time.monotonic() + seconds + 2.0  # torch's own timeout first, where it keeps it
    while t.is_alive() and time.monotonic() < until:
        t.join(0.2)
    if t.is_alive():
        return None
    if "error" in box:
        raise box["error"]
    return box["store"]


@contextlib.contextmanager
def quiet_cpp_logs():
    """Send file descriptor 2 to /dev/null while ranks join: torch's C++ store logs a backtrace of
    ~40 lines on every failed call (a rank 0 gone while the others wait), ahead of the one line
    this project prints; its errors still arrive as exceptions. Python's sys.stderr is flushed
    first and is whole again after."""
    import sys

    if any(os.environ.get(v) for v in ("TORCH_CPP_LOG_LEVEL", "TORCH_DISTRIBUTED_DEBUG", "NCCL_DEBUG")):
        yield  # logs the user asked for
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a daemon): nothing to quiet
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _tell_rank0(why: str, patience: float = 3.0) -> None:
    """Best effort: leave ``why`` where ranks waiting in :func:`_join_by_hand` read it and stop, for a
    rank that refuses itself before joining (a RANK outside WORLD_SIZE); else they wait out their
    join timeout for it. Tries rank 0's port for ``patience`` seconds (ranks start together), then
    gives up silently: the caller raises its own error either way."""
    import socket
    import time

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        return
    until = time.monotonic() + patience
    while True:
        try:
            socket.create_connection((addr, int(port)), timeout=1.0).close()
            break
        except OSError:
            if time.monotonic() >= until:
                return
            time.sleep(0.2)
    with contextlib.suppress(Exception), quiet_cpp_logs():
        store = _store(addr, int(port), None, False, 2.0)
        if store is not None and not store.check([_REFUSED]):
            store.set(_REFUSED, why)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def peer_lost(e: BaseException) -> bool:
    """True when ``e`` is a collective or store call failing because another rank's process is gone:
    gloo and the store see their connections to it closed. (NCCL does not: its watchdog ends the
    rank after the group's timeout.)"""
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("Connection closed by peer",
                                                                   "Connection reset by peer", "Broken pipe"))


def wrap(module: nn.Module) -> nn.Module:
    """DistributedDataParallel around ``module`` when distributed, else the module itself."""
    if rank_world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean of ``t`` across ranks (no-op in one process)."""
    if rank_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def check_same(what: str, value) -> None:
    """Refuse a run whose ranks were started with different ``value`` (JSON-able: the settings, the
    data): each would train its own way, or wait forever on a collective the others never make
    (ns on one rank, plain on another hung). No-op in one process; call it on every rank before
    any other collective.

    Raises:
        NsvitError: the ranks that differ from rank 0."""
    if rank_world()[1] == 1:
        return
    import hashlib
    import json

    from .errors import NsvitError

    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, digest)
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise NsvitError(f"the ranks were started with different {what}: rank(s) {odd} differ from rank 0; "
                         f"give every rank the same command")


__all__ = ["rank_world", "init_from_env", "peer_lost", "wrap", "all_mean", "check_same"]

"""Process groups and device meshes: ranks spawned by dtplan (gloo on CPU,
NCCL on CUDA) or launched by torchrun (RANK / WORLD_SIZE in the environment).

Spawned ranks start from multiprocessing's forkserver, which has imported
torch and the runtime once (`start_method`; docs/architecture.md, "Starting
ranks"). Ranks rendezvous through a FileStore in a private temporary folder,
so no port is ever chosen by us. Teardown waits on a barrier first: destroying a
process group right after functional collectives aborts ranks now and then.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dtplan.planner.mesh import MeshSpec
from dtplan.runtime.host import keep_freed_memory, prioritise_communication
from dtplan.runtime.watch import last_entered

__all__ = [
    "Interrupted", "LaunchError", "Terminated", "check_rank_count", "device_type", "launched_by_torchrun", "process_group", "realtime_communication", "spawn",
    "start_method",
]

#: a rank's work: (rank, mesh) -> JSON-serialisable result
Work = Callable[[int, DeviceMesh], object]

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A rank failed; the message carries its error."""


class Interrupted(KeyboardInterrupt):
    """SIGINT while ranks ran: every rank was stopped first."""

    def __init__(self, ranks_stopped: int) -> None:
        super().__init__(f"interrupted; {ranks_stopped} rank(s) stopped")
        self.ranks_stopped = ranks_stopped


class Terminated(SystemExit):
    """SIGTERM or SIGHUP while ranks ran: every rank was stopped first; the
    exit code is 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int, ranks_stopped: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.ranks_stopped = ranks_stopped


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def process_group(mesh: MeshSpec, *, rank: int | None = None, store_path: str | None = None, timeout_s: float | None = None):
    """Initialise the default group (env:// under torchrun, else a FileStore)
    and yield this rank's DeviceMesh; tear down cleanly on exit. A collective
    that waits longer than `timeout_s` (torch's default: 30 minutes) raises."""
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dev = device_type()
    backend = "nccl" if dev == "cuda" else "gloo"
    if dev == "cpu":
        keep_freed_memory()
    if launched_by_torchrun():
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if dev == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        dist.init_process_group(backend, **timeout)
    else:
        world = mesh.size
        if dev == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, **timeout)
    if world != mesh.size:
        dist.destroy_process_group()
        raise LaunchError(f"mesh {mesh} needs {mesh.size} ranks; the launcher started {world}")
    try:
        device_mesh = init_device_mesh(dev, tuple(mesh.shape), mesh_dim_names=tuple(mesh.axis_names))
        if backend == "gloo" and realtime_communication(world):
            # a group's threads name themselves as they start: a first
            # collective on each group, and a moment for the idle ones; then
            # they get the real-time policy where permitted
            for axis in range(device_mesh.ndim):
                dist.barrier(group=device_mesh.get_group(axis))
            time.sleep(0.02)
            prioritise_communication()
        yield device_mesh
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _rank_main(rank: int, mesh_json: dict, work_file: str, folder: str, timeout_s: float | None, parent: dict) -> None:
    # a rank forked by the forkserver has the server's environment, folder
    # and import path, taken when the server started: the parent's, now
    os.environ.clear()
    os.environ.update(parent["environ"])
    os.chdir(parent["cwd"])
    sys.path[:] = parent["path"]  # (the stdio were put in place as the arguments arrived)
    # a rank killed by a fault (a native crash in a backend) prints where it
    # was, in Python, to the stderr it shares with the parent
    faulthandler.enable(all_threads=True)
    _no_shared_locks()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
    mesh = MeshSpec.from_json(mesh_json)
    if device_type() == "cpu":
        # the ranks share this machine's cores: one share each, not every
        # rank running a thread per core (4 ranks on 2 cores ran 8 threads)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // mesh.size))
    # the parent owns interruption: on Ctrl-C (sent to the whole process
    # group) it ends the ranks itself, so they print no tracebacks of their own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = _result_path(folder, rank)
    try:
        # in the try: work that cannot be loaded (its module missing here) is
        # this rank's error, and the others are stopped after their grace
        work: Work = pickle.loads(Path(work_file).read_bytes())
        with process_group(mesh, rank=rank, store_path=str(Path(folder) / "store"), timeout_s=timeout_s) as device_mesh:
            # written before teardown: an error raised while tearing down
            # leaves it standing (a rank killed then still fails the run: _join)
            _write(out, {"ok": True, "result": work(rank, device_mesh)})
    except BaseException as e:  # noqa: BLE001 - reported to the parent as data
        if not out.exists():
            _write(out, {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "collective": last_entered()})


def _no_shared_locks() -> None:
    """torch.fx's interpreter opens a (disabled) tqdm progress bar, and tqdm's
    first bar makes a multiprocessing lock: a named semaphore registered with
    the parent's resource tracker. A rank stopped by a signal never releases
    it, and the tracker then warns of a leak on the parent's stderr after a
    Ctrl-C. A rank draws no bars: a thread lock does."""
    try:
        import tqdm
    except ImportError:
        return
    tqdm.tqdm.set_lock(threading.RLock())


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # whole or absent, never half written


def spawn(work: Work, mesh: MeshSpec, *, timeout_s: float | None = None, grace_s: float = 5.0) -> list[object]:
    """Run `work` on mesh.size spawned ranks; return each rank's result in rank order.

    `work` must be a module-level function (it is imported by the children).
    SIGINT, SIGTERM or SIGHUP to this process ends every rank (and removes
    the rendezvous folder) before it is raised here: `Interrupted` (a
    KeyboardInterrupt) for SIGINT, `Terminated` (a SystemExit, code 143 or
    129) for the others. A collective waiting longer than `timeout_s` fails
    its rank; once a rank has failed, the others get `grace_s` to finish
    and are then stopped, so a dead or hung rank ends the run.
    """
    check_rank_count(mesh.size)
    with tempfile.TemporaryDirectory(prefix="dtplan-") as folder:
        # the work goes by file, not with the process arguments: a start
        # waits until its child has read its arguments, which it does only
        # after importing (seconds), so arguments past the pipe's buffer
        # (a plan, a shipped capture) would start the ranks one by one
        work_file = Path(folder) / "work.pickle"
        work_file.write_bytes(pickle.dumps(work))
        method = start_method()
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts (once per process)
        parent = {"environ": dict(os.environ), "cwd": os.getcwd(), "path": list(sys.path), "stdio": [_Stdio(1), _Stdio(2)]}
        processes = [
            ctx.Process(target=_rank_main, args=(rank, mesh.to_json(), str(work_file), folder, timeout_s, parent), name=f"dtplan-rank{rank}")
            for rank in range(mesh.size)
        ]
        try:
            with _signals_raise():
                for p in processes:
                    p.start()
                _join(processes, folder, mesh.size, grace_s)
        except KeyboardInterrupt:
            raise Interrupted(_end(processes)) from None
        except _Signalled as e:
            raise Terminated(e.signum, _end(processes)) from None
        finally:
            _end(processes)
        return _results(folder, mesh.size)


class _Stdio:
    """The parent's stdout or stderr as it is now, put in place in the rank
    when the rank unpickles it (a forked rank's are the forkserver's, which
    are the parent's when the server started: under pytest, an earlier
    test's capture)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        # DupFd sends the descriptor along with the process (only while
        # multiprocessing pickles a process's arguments)
        return _put_in_place, (multiprocessing.reduction.DupFd(self.fd), self.fd)


def _put_in_place(dup, fd: int) -> int:
    got = dup.detach()
    if got != fd:
        os.dup2(got, fd)
        os.close(got)
    return fd


#: what the forkserver imports once, so that a rank forked from it starts
#: with torch and the runtime loaded (a spawned rank imports them itself:
#: about 5 CPU-seconds, most of a small run's time with 4 ranks on 2 cores)
_PRELOAD = ["torch", "torch.distributed", "dtplan.runtime.run"]
#: AF_UNIX's limit on a socket's path (Linux: 108 bytes with the NUL)
_SOCKET_PATH_MAX = 107


def start_method() -> str:
    """How `spawn` starts ranks: DTPLAN_START_METHOD if set, else
    multiprocessing's forkserver on CPU where there is one and its socket's
    path fits (it lies in a folder under the temporary folder, about 40 bytes
    deep: a long TMPDIR fails the server's start), else spawn."""
    chosen = os.environ.get("DTPLAN_START_METHOD")
    if chosen:
        if chosen not in ("spawn", "forkserver"):
            raise LaunchError(f"DTPLAN_START_METHOD must be spawn or forkserver, not {chosen!r}")
        return chosen
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if device_type() == "cuda":
        # a GPU rank's start is mostly CUDA's and NCCL's own set-up, and the
        # GPU path was checked with spawned ranks (bench/gpu_check.py)
        return "spawn"
    if len(tempfile.gettempdir()) + 40 > _SOCKET_PATH_MAX:
        return "spawn"
    return "forkserver"


def realtime_communication(world: int) -> bool:
    """Whether this rank's gloo threads get the real-time policy
    (`host.prioritise_communication`): asked for with DTPLAN_REALTIME_COMM=1,
    and only where every rank of this host has a core of its own. gloo's
    threads spin at times while they wait (for the peer's data, or for
    another thread's lock); a spinning real-time thread starves whatever
    fair-policy thread shares its core, and with more ranks than cores that
    can be the very rank it waits for: a 4-rank FSDP step on 2 cores stalled
    for minutes. Off by default for that reason: the test suite runs two
    groups of ranks at once (docs/architecture.md, "CPU ranks and their
    communication threads")."""
    if os.environ.get("DTPLAN_REALTIME_COMM", "0") != "1":
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if launched_by_torchrun() else world
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return local <= cores


def check_rank_count(ranks: int) -> None:
    """Refuse a mesh this machine cannot run: more ranks than GPUs, or on CPU
    more than 4 per core (at least 16; DTPLAN_MAX_RANKS overrides)."""
    if device_type() == "cuda":
        have = torch.cuda.device_count()
        if ranks > have:
            raise LaunchError(f"the mesh needs {ranks} ranks, one GPU each; this machine has {have}")
        return
    cores = os.cpu_count() or 1
    limit = int(os.environ.get("DTPLAN_MAX_RANKS", max(16, 4 * cores)))
    if ranks > limit:
        raise LaunchError(
            f"the mesh needs {ranks} ranks; this machine runs at most {limit} CPU ranks ({cores} cores; set DTPLAN_MAX_RANKS to change)"
        )


def _join(processes, folder: str, size: int, grace_s: float) -> None:
    """Wait for every rank. A rank that exits with an error status (killed by
    a signal, or a non-zero exit code) fails the run, whether or not it had
    written its result: a native fault in teardown is as much a fault as one
    mid-step, and a run that hides it would hide heap corruption until it
    lands somewhere worse. Once a rank has written a failed result, the
    others get `grace_s` to finish and are then stopped."""
    failed_at = None
    read: set[int] = set()  # results already read (each is read once)
    while True:
        codes = [p.exitcode for p in processes]
        bad = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
        if bad is not None:
            rank, code = bad
            how = f"signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
            path = _result_path(folder, rank)
            if not path.exists():
                raise LaunchError(f"rank {rank} died before its result was written: process {rank} terminated with {how}")
            result = json.loads(path.read_text())
            had = "" if result["ok"] else f"; it had failed: {_one_line(result['error'])}\n{result['traceback']}"
            raise LaunchError(f"rank {rank} died after writing its result, while tearing down: process {rank} terminated with {how}{had}")
        if all(c == 0 for c in codes):
            return
        if failed_at is None and _any_new_failure(folder, size, read):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            stopped = _end(processes)
            log.info("a rank failed; %d rank(s) still running after %.0f s were stopped", stopped, grace_s)
            return
        multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout=0.5)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _result_path(folder: str, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.json"


def _any_new_failure(folder: str, size: int, read: set[int]) -> bool:
    """Has a rank written a failed result since the last look?"""
    failed = False
    for r in range(size):
        path = _result_path(folder, r)
        if r not in read and path.exists():
            read.add(r)
            failed |= not json.loads(path.read_text())["ok"]
    return failed


def _results(folder: str, size: int) -> list[object]:
    """Every rank's result, or LaunchError naming the first rank that failed
    (its error), else the first that left none (stopped, or died)."""
    data = {}
    for r in range(size):
        path = _result_path(folder, r)
        if path.exists():
            data[r] = json.loads(path.read_text())
    for r, d in data.items():
        if not d["ok"]:
            silent = [q for q in range(size) if q not in data]
            also = f" (rank(s) {silent} stopped without a result)" if silent else ""
            where = f" (last collective entered: {d['collective']})" if d.get("collective") else ""
            raise LaunchError(f"rank {r} failed{where}: {_one_line(d['error'])}{also}\n{d['traceback']}")
    for r in range(size):
        if r not in data:
            raise LaunchError(f"rank {r} exited without a result")
    return [data[r]["result"] for r in range(size)]


def _one_line(error: str) -> str:
    """An error's first non-empty line (gloo's timeouts run to several)."""
    return next((line.strip() for line in error.splitlines() if line.strip()), error)


def _end(processes, grace_s: float = 3.0) -> int:
    """Terminate the ranks still running (SIGTERM, then SIGKILL after `grace_s`)
    and reap them all, so none outlives the run; how many were running."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
            p.join()
    return len(alive)


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While ranks run: SIGINT raises KeyboardInterrupt (Python's default,
    restored in case a caller changed it), SIGTERM and SIGHUP raise
    `_Signalled`, so the caller's cleanup runs instead of the process dying
    with its ranks orphaned. Only in the main thread (signals are delivered
    there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def signalled(signum, frame):
        raise _Signalled(signum)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signalled)
    signal.signal(signal.SIGHUP, signalled)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

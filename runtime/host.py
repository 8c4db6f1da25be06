"""The host process's own settings for a rank (no torch here: a probe can
import this without loading torch)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator

__all__ = ["COMMUNICATION_THREADS", "communication_threads", "keep_freed_memory", "prioritise_communication"]

#: name prefixes of gloo's threads: its TCP transport's event loop
#: (`gloo_tcp_loop`) and ProcessGroupGloo's workers (`pt_gloo_runloop`)
COMMUNICATION_THREADS = ("gloo_tcp_loop", "pt_gloo")

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Make this process's C allocator keep the memory a step frees for the
    next step, as CUDA's caching allocator does, instead of handing it back to
    the OS and faulting it in again page by page. ATen's CPU allocator is
    glibc's malloc: a tensor above its mmap threshold (128 KiB until a free
    raises it), or one at the top of a heap it trims, comes back as fresh pages,
    and a fault per 4 KiB page runs at a tenth of the memory bandwidth. Measured
    on a 2-core VM, one thread: a 3->16-channel convolution of batch 16 at 32x32
    took 1.2 ms or 0.27 ms, and a 16->32 one of batch 32 8.8 ms or 3.5 ms,
    depending on what the process had allocated before. Blocks up to `limit`
    bytes stay in the heap and the heap is never trimmed: the process keeps its
    peak, as a caching allocator does. True where set (glibc only; elsewhere a
    no-op, as are jemalloc and tcmalloc preloaded, which cache already)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc or not
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, limit)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, limit))


def prioritise_communication(prefixes: tuple[str, ...] = COMMUNICATION_THREADS) -> int:
    """Give this process's communication threads (gloo's, by name) the
    real-time policy (SCHED_FIFO, the lowest priority), so that one woken by
    data it waited for runs at once instead of after the compute thread's
    time slice. On a CPU rank the compute thread keeps its core busy, and
    Linux's fair scheduler (EEVDF) often lets a woken thread wait the slice
    out: measured on a 2-core VM, 2 ranks (cnn training, bf16), a collective
    waited for 3-10 ms in a third of the steps and ranks left a barrier up to
    3.8 ms apart; with the policy set, the waits stayed under 0.9 ms and the
    step's median and spread fell (docs/architecture.md, "CPU ranks and
    their communication threads"). The threads block when idle (gloo's loop
    sleeps in epoll), and the kernel's real-time throttling keeps 5% of each
    core for the rest. Returns how many threads run under the policy; 0
    where it is not permitted (it needs CAP_SYS_NICE: root, or a raised
    RLIMIT_RTPRIO) or not Linux, leaving them as they were. Call it after
    the groups made their threads (a first collective on each names them),
    and only where each rank has a core of its own: gloo's threads spin at
    times while they wait, and a spinning real-time thread starves what
    shares its core (`launch.realtime_communication` decides)."""
    if not hasattr(os, "sched_setscheduler"):
        return 0
    done = 0
    for tid in communication_threads(prefixes):
        try:
            if os.sched_getscheduler(tid) != os.SCHED_FIFO:
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
        except PermissionError:
            return done  # not permitted here: every thread stays as it was
        except OSError:
            continue  # the thread ended meanwhile
        done += 1
    return done


def communication_threads(prefixes: tuple[str, ...] = COMMUNICATION_THREADS) -> Iterator[int]:
    """The ids of this process's threads named with one of `prefixes`
    (Linux's /proc; none elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith(prefixes):
                    yield int(tid)
        except OSError:
            continue  # the thread ended meanwhile

"""torch's OpenMP thread team: one per process, owned by the engine thread.

libgomp (the OpenMP runtime of torch's CPU wheels) gives every thread that starts a parallel region
a pool of worker threads of its own, kept until that thread exits. While the process holds more
such threads than it has CPUs, libgomp "throttles" every pool: between two parallel regions its
workers spin ~1 000 iterations (microseconds) instead of ~300 000, then sleep on a futex, so each of
a decode step's ~250 parallel regions (projections, attention, norms) pays a sleep and a wake-up.
A server builds its model on the main thread (one pool) and decodes on the engine thread (a second
pool): 2 + 2 threads on a 2-core host, throttled for good. Measured on one stream: ~9 000 context
switches per second and 31 ms per token, against ~400 per second and 19-20 ms per token for the
same decode step run by a single thread's team (bench/README.md, "CPU runtime").

So the engine thread is the only thread that keeps a team: every other thread that may have run a
parallel torch op (the main thread after start-up, executor workers after an adapter load) gives
its pool back with :func:`release_team` (OpenMP 5's ``omp_pause_resource_all``: libgomp frees the
calling thread's pool, its workers exit). :class:`TeamlessExecutor` does that after every job.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("adapterserve")

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release threads, keep the runtime (libgomp ignores the kind)


@functools.cache
def _omp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on, or None.

    Other wheels bring their own renamed copies (sentencepiece.libs/libgomp-<hash>.so): pausing one of
    those frees nothing of torch's, so torch's own directory comes first, then a runtime of the plain
    soname (``libgomp.so.1``: what torch links to in other builds), then any other."""
    import torch  # (loads the runtime torch was built with)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/lib" in line}
    except OSError:
        return None
    mine = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
    runtimes = [p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp")) and ".so" in p]
    for path in sorted(runtimes, key=lambda p: (not os.path.realpath(p).startswith(mine),
                                                os.path.basename(p) not in ("libgomp.so.1", "libiomp5.so", "libomp.so"),
                                                p)):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle, no second runtime
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def release_team() -> bool:
    """Give back the calling thread's OpenMP worker pool (if any); False where no runtime allows it.

    Call it on a thread that is done with parallel torch work and is not the engine thread; a later
    parallel op on this thread simply builds a new pool (correct, only slower until released again)."""
    lib = _omp_runtime()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


class TeamlessExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool whose workers give back their OpenMP pool after each job (see the module doc)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return super().submit(_then_release, fn, *args, **kwargs)


def _then_release(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    finally:
        release_team()

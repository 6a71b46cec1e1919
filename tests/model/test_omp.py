"""One OpenMP team per server process (server/model/omp.py): threads other than the engine's give theirs back.

A thread that runs a parallel torch op gets a libgomp pool of ``threads - 1`` workers, visible as
extra tasks of the process; while pools add up past the CPU count, libgomp throttles every team's
spin-wait and a decode step pays ~250 futex sleeps (31 vs 20 ms per token at one stream)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from server.model.omp import TeamlessExecutor, release_team

THREADS = 2


def tasks() -> int:
    """OS threads of this process."""
    return len(os.listdir("/proc/self/task"))


def parallel_op() -> None:
    """A torch op big enough to run on every thread of the calling thread's team."""
    torch.ones(1 << 22).mul_(3).add_(1)


def settle(expected: int, timeout: float = 5.0) -> int:
    """The task count once it equals `expected` (released workers exit just after the call), or the last seen."""
    end = time.monotonic() + timeout
    while (n := tasks()) != expected and time.monotonic() < end:
        time.sleep(0.01)
    return n


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def steady_tasks() -> int:
    """The task count once threads of earlier tests have finished exiting (unchanged for 0.2 s)."""
    last, end = tasks(), time.monotonic() + 5
    while time.monotonic() < end:
        time.sleep(0.2)
        if (n := tasks()) == last:
            return n
        last = n
    return last


def on_new_thread(fn):
    """Run fn on a fresh thread that stays alive until `stop()`; returns (result, stop)."""
    result, done, release = {}, threading.Event(), threading.Event()

    def run():
        result["value"] = fn()
        done.set()
        release.wait(30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert done.wait(60)

    def stop():
        release.set()
        thread.join(30)

    return result["value"], stop


def test_the_runtime_released_is_torchs_own():
    """Other wheels load renamed copies of libgomp (sentencepiece.libs/libgomp-<hash>.so); pausing one of
    those would free nothing of torch's."""
    import sentencepiece  # noqa: F401  (brings its own libgomp copy into the process)

    from server.model import omp

    omp._omp_runtime.cache_clear()
    lib = omp._omp_runtime()
    assert lib is not None
    torch_dir = os.path.realpath(os.path.dirname(torch.__file__))
    assert os.path.realpath(lib._name).startswith(torch_dir), lib._name


def test_release_team_frees_the_threads_pool():
    base = steady_tasks()

    def work():
        parallel_op()
        with_pool = tasks()
        released = release_team()
        return with_pool, released

    (with_pool, released), stop = on_new_thread(work)
    try:
        assert released, "torch's OpenMP runtime (libgomp) was not found or refused omp_pause_resource_all"
        assert with_pool == base + 1 + (THREADS - 1)  # the thread itself + its pool's workers
        assert settle(base + 1) == base + 1  # the workers exited, the thread lives on
    finally:
        stop()


def test_a_thread_keeps_its_pool_without_release():
    """The premise: the pool outlives the op (so every long-lived thread that ran one holds one)."""
    base = steady_tasks()
    with_pool, stop = on_new_thread(lambda: (parallel_op(), tasks())[1])
    try:
        time.sleep(0.2)
        assert with_pool == tasks() == base + 1 + (THREADS - 1)
    finally:
        stop()


def test_teamless_executor_gives_the_pool_back_after_each_job():
    base = steady_tasks()
    with TeamlessExecutor(1) as pool:
        during = pool.submit(lambda: (parallel_op(), tasks())[1]).result(60)
        assert during == base + 1 + (THREADS - 1)
        assert settle(base + 1) == base + 1  # its one worker thread, no OpenMP pool left
        assert pool.submit(lambda: 7).result(60) == 7  # results and errors pass through
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(60)


def test_started_server_leaves_no_pool_outside_the_engine_thread(tiny_llama, start_server):
    """After start and a request, the thread that built the server and its event loop's thread hold no pool:
    a parallel op on either builds a fresh one (tasks grow by threads - 1)."""
    server = start_server(tiny_llama, threads=THREADS)
    assert server.generate("hello", max_new_tokens=4).usage.completion_tokens == 4

    def grows_by() -> int:
        before = tasks()
        parallel_op()
        grown = tasks() - before
        release_team()
        return grown

    assert grows_by() == THREADS - 1  # the constructing thread (this one)

    async def on_loop() -> int:
        return grows_by()

    assert asyncio.run_coroutine_threadsafe(on_loop(), server.app._loop).result(60) == THREADS - 1

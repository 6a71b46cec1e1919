"""The spare adapter-file buffer: exact sizes, reuse of the pre-faulted spare, none for small files."""

from __future__ import annotations

import time

from server.adapters.host_buffers import SpareBuffers


def _wait_for_spare(pool: SpareBuffers, timeout: float = 5.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with pool._lock:
            if pool._spare is not None and not pool._filling:
                return
        time.sleep(0.01)
    raise AssertionError("no spare buffer was prepared")


def test_next_buffer_of_the_same_size_is_the_prepared_spare():
    pool = SpareBuffers(min_bytes=1024)
    first = pool.take(4096)
    assert first.numel() == 4096
    _wait_for_spare(pool)
    spare_ptr = pool._spare.data_ptr()
    second = pool.take(4096)
    assert second.data_ptr() == spare_ptr and second.data_ptr() != first.data_ptr()
    assert int(second.sum()) == 0  # touched with zeros, not garbage


def test_another_size_gets_a_fresh_buffer_and_small_files_get_no_spare():
    pool = SpareBuffers(min_bytes=1024)
    pool.take(4096)
    _wait_for_spare(pool)
    other = pool.take(8192)
    assert other.numel() == 8192
    _wait_for_spare(pool)
    assert pool._spare.numel() == 8192
    pool = SpareBuffers(min_bytes=1024)
    assert pool.take(100).numel() == 100
    time.sleep(0.05)
    assert pool._spare is None and not pool._filling

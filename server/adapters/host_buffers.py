"""Host buffers for adapter files, touched before they are needed.

Registering an adapter reads its file into fresh memory, and the first touch of fresh memory is
what registration waited on here: in the server process (a few GB resident) the page faults of
a 20 MB buffer cost ~30 ms on the development VM, more than parsing and installing the adapter.
Fleets register many adapters of one shape, so after each registration a background thread
allocates and touches one buffer of the same size; the next registration of that size takes it
ready. At most one spare buffer exists, and only for files of at least ``MIN_BYTES``.
"""

from __future__ import annotations

import ctypes
import threading

import torch

MIN_BYTES = 1 << 20


class SpareBuffers:
    """Hands out uint8 host buffers; keeps one spare of the last requested size, pre-faulted."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._spare: torch.Tensor | None = None
        self._filling = False

    def take(self, size: int) -> torch.Tensor:
        """A buffer of exactly `size` bytes (the spare if it fits, else a new one); refills the spare."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.numel() == size:
            buf = spare
        else:
            buf = torch.empty(size, dtype=torch.uint8)
        if size >= self.min_bytes:
            self._refill(size)
        return buf

    def _refill(self, size: int) -> None:
        with self._lock:
            if self._filling:
                return
            self._filling = True
        threading.Thread(target=self._fill, args=(size,), name="adapterserve-spare-buffer", daemon=True).start()

    def _fill(self, size: int) -> None:
        try:
            buf = torch.empty(size, dtype=torch.uint8)
            # One plain memset outside the GIL (ctypes releases it) and outside torch's thread pool,
            # so it neither blocks the engine thread nor competes with its OpenMP team.
            ctypes.memset(buf.data_ptr(), 0, size)
            with self._lock:
                self._spare = buf
        finally:
            with self._lock:
                self._filling = False


SPARE_BUFFERS = SpareBuffers()

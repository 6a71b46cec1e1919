"""Host -> device writes into adapter slot tensors that never stall running requests.

On CUDA each write goes from pinned host memory on a side stream: registering an adapter then
costs the engine thread the pinning memcpy only, and the next step's compute stream waits for
the copies on the device (``wait``), never on the host. The pinned staging tensors are kept until
their copies have completed. On CPU every call is the plain in-place op (the path measured in
bench/README.md). Thread domain: the engine thread (slots change only there).
"""

from __future__ import annotations

import torch


def side_stream_uploads(device: str) -> bool:
    """Whether slot writes go through pinned memory on a side stream (CUDA only)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class SlotUploader:
    """Writes into slot tensors of `device`; see the module docstring."""

    def __init__(self, device: str):
        self.async_copies = side_stream_uploads(device)
        self._stream = torch.cuda.Stream(device=device) if self.async_copies else None
        self._event: torch.cuda.Event | None = None
        self._staging: list[torch.Tensor] = []  # pinned sources of copies that may be in flight
        self._begun = False

    def _begin(self) -> None:
        if not self._begun:  # writes land after everything already queued on the compute stream
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
            if self._event is not None and self._event.query():
                self._staging.clear()
            self._begun = True

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst[...] = src (src on the host)."""
        if not self.async_copies:
            dst.copy_(src)
            return
        self._begin()
        if src.device.type != "cpu":  # already on the device (bench/gpu_check builds adapters there)
            with torch.cuda.stream(self._stream):
                dst.copy_(src)
            return
        pinned = src.contiguous().pin_memory()
        self._staging.append(pinned)
        with torch.cuda.stream(self._stream):
            dst.copy_(pinned, non_blocking=True)

    def copy_scaled(self, dst: torch.Tensor, src: torch.Tensor, scale: float) -> None:
        """dst[...] = src * scale (src on the host)."""
        if not self.async_copies:
            torch.mul(src, scale, out=dst)
            return
        self.copy(dst, src * scale)

    def zero(self, dst: torch.Tensor) -> None:
        if not self.async_copies:
            dst.zero_()
            return
        self._begin()
        with torch.cuda.stream(self._stream):
            dst.zero_()

    def done(self) -> None:
        """Mark the end of a batch of writes (one adapter's slot)."""
        if self.async_copies and self._begun:
            self._event = torch.cuda.Event()
            self._event.record(self._stream)
            self._begun = False

    def wait(self) -> None:
        """Order the compute stream after every write so far (a device-side wait; no host sync)."""
        if self._event is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._event)

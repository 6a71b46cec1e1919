"""Host lists -> device tensors for a step's inputs, without a host sync on CUDA.

``torch.tensor(rows, device="cuda")`` copies from pageable memory and waits for the stream; from
pinned memory with ``non_blocking`` the copy is queued behind the previous step's work and the
engine thread goes on. On CPU it is the plain constructor. Thread domain: the engine thread.
"""

from __future__ import annotations

import torch


def to_device(data: list, device: str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A step input (nested lists of ints) as a tensor on `device`."""
    if torch.device(device).type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype).pin_memory().to(device, non_blocking=True)

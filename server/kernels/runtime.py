"""Whether the Triton kernels can run here, and the one place that imports triton.

``triton`` is an optional dependency (the ``gpu-test`` extra, ~1 GB installed). On a machine
without CUDA the kernels can only run in Triton's interpreter, which must be switched on before
any ``@triton.jit`` function is defined: this module does so when it is first imported, so
importing a kernel module on a CPU-only host never needs a GPU. Thread domain: import-time only.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # the default install: CPU path only
    triton = None
    tl = None


def triton_interpreting() -> bool:
    """True when @triton.jit kernels run in the CPU interpreter (no CUDA here)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: CUDA with triton installed,
    or CPU under the interpreter (used by tests and ``--kernels triton`` on CPU)."""
    if triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and triton_interpreting())


def next_pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor): tl.arange sizes and tl.dot's 16-wide minimum."""
    p = floor
    while p < n:
        p *= 2
    return p


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether kernels run tl.dot on float32 operands: for float32 models (exact 'ieee' products,
    no TF32) and under the interpreter, whose tl.dot mishandles bfloat16/float16 operands."""
    return dtype == torch.float32 or triton_interpreting()


if triton is not None:

    @triton.jit
    def dot(a, b, UPCAST: tl.constexpr):
        """a @ b accumulated in float32; operands upcast first when UPCAST (see upcast_dots)."""
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out
else:
    dot = None

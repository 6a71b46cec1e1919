"""Dense projections, routed to the fastest kernel for the device.

On x86 CPUs, oneDNN's matmul over a weight packed once into its blocked layout is 2-4x faster
than the default BLAS sgemm, for the skinny matrices of decoding (16-32 rows) and for prefill
alike (measured on the 2-core AMD EPYC this project is developed on, see bench/README.md). It sums in a different
order, so fp32 logits differ from transformers' (BLAS) by ~1e-4 instead of 0; ``--matmul blas``
selects plain ``F.linear``, which CUDA and torch builds without oneDNN always use. The dense
weight stays the source of truth: merge-on-load edits it, then calls :meth:`Projection.refresh`.

One row (a single stream's decode step) on ONE thread is the exception: there the product is a
matrix-vector product bound by reading the weight, and MKL's sgemv (``F.linear``) reads it faster
than oneDNN's packed matmul (1.16-1.2x over the model's projections, see bench/README.md). MKL's
sgemv runs on one thread whatever torch's thread count, though, and with two threads oneDNN's
packed matmul splits the weight over both (30.3 vs 43.0 ms for the 30 layers' projections at one
row): so sgemv only where torch runs one thread. From two rows on oneDNN wins (1.3x at 2 rows, 1.5x at 4).

Where our CPU kernels are built (server.model.cpu_decode; float32 in oneDNN mode), 1..8 rows take
their gemv instead, on torch's threads: one FMA pass over the weight at the host's read bandwidth
(over the 30 layers + lm_head, 1 thread, CPU clock: 1.13x oneDNN at 1 row, 1.35x at 4, 1.11x at 8,
even at 12-16; 2 threads, wall: 1.4-1.6x at 1-4 rows, 1.28x at 8; bench/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.model import cpu_decode
from server.model.cpu_features import detect

# float32 inputs of at most this many rows run MKL's sgemv / sgemm even in oneDNN mode, when torch
# runs one thread (see above).
GEMV_MAX_ROWS = 1


def onednn_usable(device: str, dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed matmul can run `dtype` on this CPU (detected, never assumed).

    bf16 needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2-only CPU oneDNN refuses to pack a
    bf16 weight, and the projection falls back to ``F.linear``. oneDNN uses the CPU's bf16 dot
    products (AVX512_BF16, AMX) where it has them; server/model/cpu_features.py reports which.
    """
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and detect().onednn_bf16


class Projection:
    """y = x @ W^T + b for x [..., in] -> [..., out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, use_onednn: bool | None = None,
                 cpu_gemv: bool = False):
        self.weight = weight  # [out, in] dense
        self.bias = bias  # [out] or None
        usable = onednn_usable(str(weight.device.type), weight.dtype)
        self.use_onednn = usable if use_onednn is None else (use_onednn and usable)
        self._gemv_in = weight.shape[1] if weight.dtype == torch.float32 else 0  # [in] when sgemv may take x
        # Our gemv (server.model.cpu_decode) for a few rows: float32 or bf16 CPU weights, default mode only.
        self.cpu_gemv = (cpu_gemv and self.use_onednn and weight.dtype in cpu_decode.KERNEL_DTYPES
                         and weight.is_contiguous())
        self.refresh()

    def refresh(self) -> None:
        """Re-derive the kernel's packed copy of the weight after the dense weight changed."""
        if self.use_onednn:
            # Packed once into oneDNN's blocked layout (the row count is only a tuning hint).
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_gemv and x.dtype == self.weight.dtype:
            y = cpu_decode.gemv(x, self.weight, self.bias)  # None beyond cpu_decode.GEMV_ROWS rows
            if y is not None:
                return y
        if not self.use_onednn or (x.numel() <= self._gemv_in * GEMV_MAX_ROWS and torch.get_num_threads() == 1):
            return F.linear(x, self.weight, self.bias)
        # [..., in] -> [..., out], dense: the op flattens the leading dimensions itself.
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

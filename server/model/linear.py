"""Dense projections, routed to the fastest kernel for the device.

On x86 CPUs, oneDNN's matmul over a weight converted once to its own tensor format is 1.7-2.5x
faster than the default BLAS sgemm for the skinny matrices of decoding (16-32 rows; measured on
the 2-core AMD EPYC this project is developed on, see bench/README.md). It sums in a different
order, so fp32 logits differ from transformers' (BLAS) by ~1e-4 instead of 0; ``--matmul blas``
selects plain ``F.linear``, which CUDA and torch builds without oneDNN always use. The dense
weight stays the source of truth: merge-on-load edits it, then calls :meth:`Projection.refresh`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onednn_usable(device: str, dtype: torch.dtype) -> bool:
    return device == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


class Projection:
    """y = x @ W^T + b for x [..., in] -> [..., out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, use_onednn: bool | None = None):
        self.weight = weight  # [out, in] dense
        self.bias = bias  # [out] or None
        usable = onednn_usable(str(weight.device.type), weight.dtype)
        self.use_onednn = usable if use_onednn is None else (use_onednn and usable)
        self.refresh()

    def refresh(self) -> None:
        """Re-derive the kernel's copy of the weight after the dense weight changed."""
        if not self.use_onednn:
            return
        self._w = self.weight.to_mkldnn()
        bias = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], dtype=self.weight.dtype)
        self._b = bias.to_mkldnn()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_onednn:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn(), self._w, self._b)
        return y.to_dense().view(*lead, self.weight.shape[0])

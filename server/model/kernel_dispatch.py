"""Which forward a runtime uses: the torch path (CPU) or the fused Triton kernels (CUDA).

Kept apart from llama.py so the model file only holds one dispatch line, and importing it never
imports triton on a CPU-only install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.model.llama import LlamaRuntime, PagedKVCache, StepInput

KERNEL_CHOICES = ("auto", "triton", "torch")


def kernels_wanted(kernels: str, device: str) -> bool:
    """--kernels auto: Triton on CUDA when triton is installed; triton: always (CPU = interpreter,
    for tests); torch: never."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "torch" or (kernels == "auto" and torch.device(device).type != "cuda"):
        return False  # the CPU path never imports triton
    from server.kernels.runtime import kernels_available

    if kernels == "triton":
        if not kernels_available(device):
            raise RuntimeError("--kernels triton needs the triton package (pip install '.[gpu-test]') and CUDA, "
                               "or TRITON_INTERPRET=1 on CPU")
        return True
    return kernels_available(device)


def kernel_forward(rt: LlamaRuntime, step: StepInput, cache: PagedKVCache, all_logits: bool) -> torch.Tensor:
    from server.model.kernel_forward import kernel_forward as forward

    return forward(rt, step, cache, all_logits)

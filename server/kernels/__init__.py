"""Fused GPU kernels (Triton) with a pure-PyTorch reference beside each.

One module per concern: ``lora`` (batched shrink/expand over rows grouped by adapter slot),
``paged_attention`` (attention reading K/V through the page table), ``norm`` (residual add +
RMSNorm), ``rope`` (rotary embedding fused with the KV-cache write), ``sampling`` (temperature,
top-k, top-p and the draw per row, without sorting the vocabulary). The model uses them on CUDA
(see server/model/kernel_forward.py), and so does the engine's sampler; the CPU path keeps its
torch/oneDNN kernels. Without a GPU the same kernels run in Triton's interpreter on CPU tensors,
which is how the test suite checks them against their references.
"""

from server.kernels.runtime import kernels_available, triton_interpreting

__all__ = ["kernels_available", "triton_interpreting"]

"""What this CPU can do, detected once at start, and the report of the kernels chosen for it.

Machines differ between runs (AVX2 only; AVX-512; AVX-512 with BF16 dot products; AMX), and the
choice of kernels follows (``server/model/linear.py`` decides, this module reports): the start log
and ``GetModelInfo.kernels`` say which matmul backend, dtype and KV dtype run, on what capability,
and why when it is not the fast path (``--dtype bfloat16`` without native bf16 dot products).
Pure functions over parsed inputs, plus :func:`detect` which reads /proc/cpuinfo and asks torch;
any thread.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

# The /proc/cpuinfo flags that matter to the kernels here, in report order.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                  "avx512_bf16", "avx512_fp16", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # bf16 dot products in hardware


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU as the kernels see it."""

    model: str  # /proc/cpuinfo "model name"
    flags: frozenset[str]  # the REPORTED_FLAGS this CPU has
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    onednn_bf16: bool  # oneDNN runs bf16 here (natively, or emulated on AVX-512 BW/VL/DQ)

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512_BF16 or AMX-BF16)."""
        return bool(self.flags & NATIVE_BF16_FLAGS)

    @property
    def vnni(self) -> bool:
        """int8 dot products (AVX512-VNNI or AVX-VNNI)."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni"})

    def flag_list(self) -> list[str]:
        return [f for f in REPORTED_FLAGS if f in self.flags]


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, REPORTED_FLAGS present) from /proc/cpuinfo text (the first processor's block)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split()) & frozenset(REPORTED_FLAGS)
        if model and flags:
            break
    return model, flags


@functools.cache
def detect(cpuinfo: str = "/proc/cpuinfo") -> CpuFeatures:
    """This machine's CpuFeatures (cached). Without /proc/cpuinfo (not Linux) the flags are empty and
    torch's capability still says which vector ISA its kernels use."""
    try:
        model, flags = parse_cpuinfo(Path(cpuinfo).read_text())
    except OSError:
        model, flags = "", frozenset()
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_bf16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return CpuFeatures(model, flags, capability, onednn_bf16)


@dataclass(frozen=True)
class KernelReport:
    """The kernels chosen at start (GetModelInfo.kernels and the start log)."""

    matmul: str  # onednn (packed oneDNN matmul) | blas (torch F.linear) | triton (fused CUDA kernels) | cublas
    dtype: str  # weights and activations
    kv_dtype: str  # KV cache
    cpu_capability: str
    cpu_features: list[str]
    native_bf16: bool
    onednn_bf16: bool
    note: str  # why, when the choice is not the fast path for the request; "" otherwise
    # CPU decode steps: "ours" (server/kernels/cpu: gemv up to a few rows, fused decode ops), "torch" (oneDNN
    # packed matmul + torch ops), or "" (not a CPU oneDNN runtime in float32 or bf16). Start log only.
    decode: str = ""

    def log_line(self) -> str:
        cpu = f"{self.cpu_capability} [{' '.join(self.cpu_features) or 'no flags read'}]"
        decode = f" decode={self.decode}" if self.decode else ""
        return (f"kernels: matmul={self.matmul} dtype={self.dtype} kv={self.kv_dtype}{decode}; cpu {cpu}, "
                f"native bf16 {'yes' if self.native_bf16 else 'no'}, oneDNN bf16 {'yes' if self.onednn_bf16 else 'no'}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_report(device: str, dtype: torch.dtype, kv_dtype: torch.dtype, use_onednn: bool, use_kernels: bool,
                  matmul_flag: str, cpu: CpuFeatures, cpu_kernels: bool = False) -> KernelReport:
    """Name the kernels a runtime chose (`use_onednn`, `use_kernels`, `cpu_kernels` as it decided them) and
    say why when ``--dtype bfloat16``/``float16`` on CPU does not get hardware dot products."""
    if str(device).startswith("cuda"):
        matmul = "triton" if use_kernels else "cublas"
    else:
        matmul = "onednn" if use_onednn else "blas"
    note = ""
    if not str(device).startswith("cuda"):
        if dtype == torch.bfloat16 and not cpu.native_bf16:
            if use_onednn:
                note = ("no native bf16 dot products (AVX512_BF16/AMX-BF16): oneDNN emulates bf16 on AVX-512, "
                        "halving weight bytes but not speeding arithmetic")
            else:
                note = ("no native bf16 dot products and oneDNN cannot run bf16 on this CPU (needs AVX-512 or "
                        "AVX-NE-CONVERT): bf16 matmuls take torch's generic kernels; --dtype float32 is faster here")
        elif dtype == torch.bfloat16 and matmul_flag == "onednn" and not use_onednn:
            note = "oneDNN unavailable in this torch build: bf16 matmuls take torch's generic kernels"
        elif dtype == torch.float16:
            note = "float16 on CPU: torch's generic kernels (no oneDNN fp16 path is chosen); --dtype float32 is faster"
    decode = ""
    if not str(device).startswith("cuda") and use_onednn and dtype in (torch.float32, torch.bfloat16):
        decode = "ours" if cpu_kernels else "torch"
    return KernelReport(matmul=matmul, dtype=_name(dtype), kv_dtype=_name(kv_dtype),
                        cpu_capability=cpu.capability, cpu_features=cpu.flag_list(), native_bf16=cpu.native_bf16,
                        onednn_bf16=cpu.onednn_bf16, note=note, decode=decode)

"""CPU feature detection (fake /proc/cpuinfo texts), the kernel report per machine kind, and what
GetModelInfo and the start log say on this machine."""

from __future__ import annotations

import logging

import pytest
import torch

from adapterserve.v1 import adapterserve_pb2 as pb
from server.model.cpu_features import CpuFeatures, detect, kernel_report, parse_cpuinfo
from server.model.linear import onednn_usable

# Trimmed /proc/cpuinfo texts of the machine kinds these sessions run on.
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni clzero
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx fma f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni \
avx512_fp16 amx_bf16 amx_tile amx_int8 arch_lbr
"""
CASCADE_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU @ 2.80GHz
flags\t\t: fpu sse2 avx fma f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni
"""
ZEN4 = """model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_vnni avx_vnni
"""


@pytest.mark.parametrize("text, model, flags, native_bf16, vnni", [
    (EPYC_AVX2, "AMD EPYC", ["avx2", "fma", "f16c"], False, False),
    (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
     ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
      "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"], True, True),
    (CASCADE_LAKE, "Intel(R) Xeon(R) CPU @ 2.80GHz",
     ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"], False, True),
    (ZEN4, "AMD EPYC 9654 96-Core Processor",
     ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16"], True, True),
    ("", "", [], False, False),  # no /proc/cpuinfo content: nothing claimed
    ("processor\t: 0\nflags\t\t:\n", "", [], False, False),
])
def test_parse_cpuinfo(text, model, flags, native_bf16, vnni):
    got_model, got_flags = parse_cpuinfo(text)
    cpu = CpuFeatures(got_model, got_flags, "X", False)
    assert got_model == model and cpu.flag_list() == flags  # report order, only the flags that matter
    assert cpu.native_bf16 is native_bf16 and cpu.vnni is vnni


def _cpu(text: str, onednn_bf16: bool, capability: str = "AVX512") -> CpuFeatures:
    model, flags = parse_cpuinfo(text)
    return CpuFeatures(model, flags, capability, onednn_bf16)


@pytest.mark.parametrize("cpu, dtype, use_onednn, matmul, note", [
    # float32: oneDNN packed (default) or BLAS (--matmul blas), never a note.
    (_cpu(EPYC_AVX2, False, "AVX2"), torch.float32, True, "onednn", ""),
    (_cpu(EPYC_AVX2, False, "AVX2"), torch.float32, False, "blas", ""),
    # bf16 with native dot products: the fast path, nothing to say.
    (_cpu(SAPPHIRE_RAPIDS, True), torch.bfloat16, True, "onednn", ""),
    (_cpu(ZEN4, True), torch.bfloat16, True, "onednn", ""),
    # bf16 on AVX-512 without bf16 dot products: oneDNN emulates, and says so.
    (_cpu(CASCADE_LAKE, True), torch.bfloat16, True, "onednn", "emulates bf16"),
    # bf16 on AVX2 only: oneDNN cannot run it; generic kernels, float32 recommended.
    (_cpu(EPYC_AVX2, False, "AVX2"), torch.bfloat16, False, "blas", "--dtype float32 is faster"),
    (_cpu(EPYC_AVX2, False, "AVX2"), torch.float16, False, "blas", "float16 on CPU"),
])
def test_kernel_report_names_the_choice_and_says_why(cpu, dtype, use_onednn, matmul, note):
    report = kernel_report("cpu", dtype, dtype, use_onednn, False, "onednn", cpu)
    assert report.matmul == matmul and report.dtype == str(dtype).removeprefix("torch.")
    assert report.kv_dtype == report.dtype and report.cpu_capability == cpu.capability
    assert report.cpu_features == cpu.flag_list() and report.native_bf16 is cpu.native_bf16
    assert (note in report.note) if note else report.note == ""
    line = report.log_line()
    assert f"matmul={matmul}" in line and f"dtype={report.dtype}" in line and cpu.capability in line
    if matmul == "onednn" and dtype in (torch.float32, torch.bfloat16):  # our decode kernels, or torch's ops
        assert report.decode == "torch" and "decode=torch;" in line
        assert "decode=ours;" in kernel_report("cpu", dtype, dtype, True, False, "onednn", cpu, True).log_line()
    else:
        assert "decode=" not in line


def test_kernel_report_on_cuda():
    cpu = _cpu(EPYC_AVX2, False, "AVX2")
    assert kernel_report("cuda", torch.bfloat16, torch.bfloat16, False, True, "onednn", cpu).matmul == "triton"
    report = kernel_report("cuda", torch.float16, torch.float16, False, False, "onednn", cpu)
    assert report.matmul == "cublas" and report.note == ""  # CPU notes never apply to a CUDA device


def test_detect_reads_this_machine_and_agrees_with_the_kernel_choice():
    cpu = detect()
    text = open("/proc/cpuinfo").read()
    flags_line = next(line for line in text.splitlines() if line.startswith("flags"))
    assert set(cpu.flag_list()) <= set(flags_line.split(":", 1)[1].split())
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.onednn_bf16 == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert onednn_usable("cpu", torch.bfloat16) is cpu.onednn_bf16  # linear.py decides on the same facts
    assert detect() is cpu  # read once
    assert detect("/nonexistent/cpuinfo").flags == frozenset()


@pytest.mark.parametrize("overrides, matmul, dtype", [
    ({}, "onednn", "float32"),
    ({"matmul": "blas"}, "blas", "float32"),
    ({"dtype": "bfloat16"}, "onednn" if detect().onednn_bf16 else "blas", "bfloat16"),
])
def test_model_info_and_start_log_report_the_kernels(start_server, tiny_llama, caplog, overrides, matmul, dtype):
    with caplog.at_level(logging.INFO, logger="adapterserve"):
        srv = start_server(tiny_llama, **overrides)
    k = srv.gen.GetModelInfo(pb.GetModelInfoRequest()).kernels
    cpu = detect()
    assert (k.matmul, k.dtype, k.kv_dtype) == (matmul, dtype, dtype)
    assert k.matmul == ("onednn" if srv.app.model.runtime.use_onednn else "blas")  # what the runtime runs
    assert str(srv.app.engine.cache.k[0].dtype) == f"torch.{k.kv_dtype}"
    assert k.cpu_capability == cpu.capability and list(k.cpu_features) == cpu.flag_list()
    assert (k.native_bf16, k.onednn_bf16) == (cpu.native_bf16, cpu.onednn_bf16)
    assert bool(k.note) == (dtype == "bfloat16" and not cpu.native_bf16)
    logged = [r for r in caplog.records if r.getMessage().startswith("kernels: ")]
    assert len(logged) == 1 and f"matmul={matmul} dtype={dtype} kv={dtype}" in logged[0].getMessage()
    # oneDNN mode (float32, or bf16 where oneDNN runs it) names the decode kernels: ours where
    # server/kernels/cpu builds (it does here).
    decode = " decode=ours;" if matmul == "onednn" else ";"
    assert f"kv={dtype}{decode}" in logged[0].getMessage()
    assert srv.app.model.runtime.use_cpu_kernels is (decode == " decode=ours;")
    assert k.decode == ("ours" if decode == " decode=ours;" else "")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--dtype" in r.getMessage()]
    assert warned == ([f"--dtype {dtype}: {k.note}"] if k.note else [])

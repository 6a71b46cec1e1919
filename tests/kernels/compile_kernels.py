"""Compile every Triton kernel for an H100/H200-class GPU (sm_90) to a cubin, without a GPU.

The interpreter runs kernels as Python and lets through what compiled Triton refuses (a constexpr
reassigned in a loop, types that change across branches, ...). Triton's NVIDIA backend and its
bundled ptxas compile for a target named here, so the compiled path is checked on this CPU too.
Run as ``TRITON_INTERPRET=0 python -m tests.kernels.compile_kernels`` (tests/kernels/test_compile.py);
prints one line per kernel.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compiled @jit functions, not interpreted

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from server.kernels import lora, norm, paged_attention, rope, sampling  # noqa: E402

I32, F32, BF16, P_BF16, P_F32, P_I32, P_I64 = "i32", "fp32", "bf16", "*bf16", "*fp32", "*i32", "*i64"


def _sig(names: str, types: list[str], **constexprs) -> tuple[dict, dict]:
    args = names.split()
    assert len(args) == len(types), (args, types)
    sig = dict(zip(args, types, strict=True))
    sig.update({k: "constexpr" for k in constexprs})
    return sig, constexprs


KERNELS = {  # name: (kernel, signature, constexprs) as the model launches them on CUDA in bfloat16
    "lora shrink": (lora._shrink_kernel, *_sig(
        "x_ptr at_ptr y_ptr order_ptr counts_ptr starts_ptr K R stride_xm stride_as stride_ak stride_ym",
        [P_BF16, P_BF16, P_F32, P_I64, P_I32, P_I32] + [I32] * 6,
        BLOCK_M=lora.BLOCK_M, BLOCK_N=16, BLOCK_K=lora.BLOCK_K, UPCAST=False)),
    "lora expand": (lora._expand_kernel, *_sig(
        "y_ptr b0_ptr b1_ptr b2_ptr out_ptr order_ptr counts_ptr starts_ptr RANK W0 W1 W2 C0 C1 C2 MAX_W "
        "stride_ym stride_om", [P_F32, P_BF16, P_BF16, P_BF16, P_BF16, P_I64, P_I32, P_I32] + [I32] * 10,
        NUM_PROJ=3, BLOCK_M=lora.BLOCK_M, BLOCK_N=lora.BLOCK_N, BLOCK_R=16)),
    "paged attention": (paged_attention._paged_attention_kernel, *_sig(
        "q_ptr k_ptr v_ptr out_ptr tables_ptr start_ptr lengths_ptr S D sm_scale stride_qb stride_qs stride_qh "
        "stride_ob stride_os stride_oh stride_kt stride_kh stride_tb",
        [P_BF16] * 4 + [P_I64] * 3 + [I32, I32, F32] + [I32] * 9,
        GROUP=4, PAGE=16, BLOCK_M=paged_attention.BLOCK_M, BLOCK_N=paged_attention.BLOCK_N, BLOCK_D=64,
        UPCAST=False)),
    "add + rmsnorm": (norm._rms_norm_kernel, *_sig(
        "x_ptr delta_ptr w_ptr sum_ptr out_ptr H eps", [P_BF16] * 5 + [I32, F32], HAS_DELTA=True, BLOCK_H=2048)),
    "rope + kv write": (rope._rope_write_kernel, *_sig(
        "qkv_ptr cos_ptr sin_ptr start_ptr lengths_ptr tables_ptr k_ptr v_ptr q_ptr S HEADS KV_HEADS D "
        "stride_qkv_t stride_cos stride_kt stride_kh stride_tb",
        [P_BF16] * 3 + [P_I64] * 3 + [P_BF16] * 3 + [I32] * 9, PAGE=16, BLOCK=32)),
    "sampling": (sampling._sample_kernel, *_sig(
        "logits_ptr stride_row temps_ptr top_k_ptr top_p_ptr u_ptr out_ptr stats_ptr V greedy_below",
        [P_F32, I32, P_F32, P_F32, P_F32, P_F32, P_I64, P_F32, I32, F32],
        BLOCK=sampling.BLOCK, NP=sampling.NUM_PIVOTS)),
}


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for name, (kernel, signature, constexprs) in KERNELS.items():
        compiled = triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs), target=target)
        print(f"{name}: {len(compiled.asm['cubin'])} bytes of sm_90 cubin", flush=True)


if __name__ == "__main__":
    main()

"""Every Triton kernel also compiles (sm_90 cubin) on this CPU: what the interpreter cannot check.

A subprocess, because this test process runs the kernels in the interpreter (TRITON_INTERPRET=1 is
fixed before triton is imported) and the compile check needs it off; see compile_kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ["lora shrink", "lora expand", "paged attention", "add + rmsnorm", "rope + kv write", "sampling"]


def test_every_kernel_compiles_for_a_gpu_target_without_a_gpu():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.compile_kernels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == KERNELS

"""Kernel tests run the Triton kernels in the interpreter on CPU.

server.kernels.runtime switches the interpreter on; it must be imported before anything else
imports triton (the interpreter is chosen when triton's own @jit helpers are defined).
"""

from server.kernels import runtime

if runtime.triton is None:  # installs without the gpu-test extra (make install adds it)
    collect_ignore_glob = ["test_*.py"]

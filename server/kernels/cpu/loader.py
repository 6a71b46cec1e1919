"""Build and load the CPU decode kernels (decode.cpp) on first use.

The extension is compiled on the machine that runs it, with ``-O3 -march=native -fopenmp``: the
compiler's target flags are the feature detection (AVX2+FMA code where the CPU has it, plain loops
elsewhere). The build directory is keyed on the source, the CPU (model name and flags), torch and
Python, under ``<cache>/torch_extensions/<hash>`` (``<cache>`` as the default model's:
``$ADAPTERSERVE_CACHE_DIR`` or ``~/.cache/adapterserve``), so a later start on the same machine
loads the built library in well under a second, and another CPU builds its own.

If the build fails (no compiler, no ninja, a header mismatch) :func:`load_decode_kernels` logs one
warning and returns None; the runtime then keeps its torch path. Any thread; the first call builds
under a lock, later calls return the loaded module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("adapterserve.model")

SOURCE = Path(__file__).with_name("decode.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build (a build takes ~40 s)
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def _cpu_key() -> str:
    """The CPU's model name and flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def build_dir() -> Path:
    """Where this machine's build of decode.cpp lives."""
    from server.model.default_model import default_cache_dir

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _cpu_key().encode(), torch.__version__.encode(), sys.version.encode(),
                 " ".join(CFLAGS).encode()):
        key.update(part)
    return default_cache_dir() / "torch_extensions" / key.hexdigest()[:16]


def _clear_stale_lock(lock: Path) -> None:
    """torch's build lock (a file) outlives a process killed while building, and every later build would
    wait on it forever: remove it once it is far older than a build takes."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("removed a stale CPU kernel build lock: %s", lock)
    except FileNotFoundError:
        pass


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH: when PATH has none, add the pip package's binary (a
    dependency of the project) and the interpreter's own bin folder, as an unactivated venv needs."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", "")])


def _reason(exc: Exception) -> str:
    """One line saying why the build failed: the compiler's first error line when there is one."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    errors = [ln for ln in lines if "error" in ln.lower() and ln is not lines[0]]
    return " / ".join(line.strip() for line in [lines[0], *errors[:1]])[:400]


def load_decode_kernels() -> ModuleType | None:
    """The compiled kernels module (gemv, add_rms_norm, silu_mul, rope_attend_decode), or None when it
    cannot be built here (one warning line; callers keep the torch path)."""
    with _lock:
        if "decode" in _loaded:
            return _loaded["decode"]
        module = None
        try:
            if os.environ.get("ADAPTERSERVE_CPU_KERNELS", "1") == "0":
                raise RuntimeError("disabled by ADAPTERSERVE_CPU_KERNELS=0")
            from torch.utils.cpp_extension import load

            _ninja_on_path()
            directory = build_dir()
            directory.mkdir(parents=True, exist_ok=True)
            _clear_stale_lock(directory / "lock")
            module = load(name="adapterserve_cpu_decode", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                          extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure means: keep the torch path
            log.warning("CPU decode kernels unavailable, using the torch path: %s", _reason(exc))
        _loaded["decode"] = module
        return module

"""Call AdapterHub (``adapters`` 1.3) in the reference environment from the project's tests.

``adapters`` pins transformers ~=4.57, older than the project's, so it lives in its own venv
(``.venv-ref``, built by ``make ref-env``; ``make test`` and CI build it). Each call runs
``tests/bottleneck_reference.py`` there as a subprocess with one JSON request.

:func:`require_ref_env` fails under CI (``CI=true``) when the environment is missing, and skips with
the reason elsewhere, as the Prometheus tests do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.metrics.prometheus_harness import in_ci

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = Path(os.environ.get("ADAPTERSERVE_REF_VENV", ROOT / ".venv-ref")) / "bin" / "python"
SCRIPT = ROOT / "tests" / "bottleneck_reference.py"


def require_ref_env() -> Path:
    """The reference venv's python; when missing, fail under CI and skip (reason shown by -ra) elsewhere."""
    if REF_PYTHON.exists() and (REF_PYTHON.parent.parent / ".installed").exists():
        return REF_PYTHON
    reason = f"AdapterHub reference environment missing ({REF_PYTHON.parent.parent}); build it with `make ref-env`"
    if in_ci():
        pytest.fail(f"{reason}; CI must build it (`make test` does)", pytrace=False)
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)
    raise AssertionError("unreachable")  # pragma: no cover


def call(command: str, **request) -> dict:
    """Run one command of tests/bottleneck_reference.py in the reference venv; its JSON answer."""
    return call_many([{"command": command, **request}])[0]


def call_many(requests: list[dict]) -> list:
    """Run several commands in one reference process (each start imports transformers + adapters)."""
    python = require_ref_env()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(python), "-P", str(SCRIPT)], input=json.dumps({"batch": requests}),
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise AssertionError(f"reference {[r['command'] for r in requests]} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def make_request(base_dir: str | Path, out_dir: str | Path, config_class: str = "SeqBnConfig", seed: int = 0,
                 std: float = 0.3, **config) -> dict:
    """A ``make`` request: an AdapterHub bottleneck adapter with random weights (``std``), saved by
    ``save_adapter(..., use_safetensors=True)`` at `out_dir` (for :func:`call_many`)."""
    return {"command": "make", "base_dir": str(base_dir), "out_dir": str(out_dir), "config_class": config_class,
            "seed": seed, "std": std, "config": config}


def make_bottleneck_adapters(*requests: dict) -> None:
    """Make several adapters (see :func:`make_request`) in one reference process."""
    call_many(list(requests))


def greedy_request(base_dir: str | Path, adapter_dir: str | Path | None, prompts: list[list[int]],
                   max_new_tokens: int) -> dict:
    """A ``greedy`` request; its answer's ``results`` hold tokens and logprobs per prompt (full forward
    per step, no cache)."""
    return {"command": "greedy", "base_dir": str(base_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
            "prompts": prompts, "max_new_tokens": max_new_tokens}


def block_request(base_dir: str | Path, adapter_dir: str | Path, layer: int, site: str, o, r) -> dict:
    """A ``block`` request: AdapterHub's residual stream after the bottleneck at (layer, site) for
    sub-layer output o and residual r (nested lists [B, S, H]); the answer's ``out``."""
    return {"command": "block", "base_dir": str(base_dir), "adapter_dir": str(adapter_dir), "layer": layer,
            "site": site, "o": o, "r": r}

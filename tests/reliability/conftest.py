"""Shared fixtures of the reliability suite: adapters of every kind, PEFT references, module-scoped servers."""

from __future__ import annotations

import contextlib

import pytest

from tests.peft_reference import make_peft_adapter, peft_greedy_reference
from tests.serving import start_server_fixture

KINDS = ("lora", "prompt", "ptuning", "prefix")
N_NEW = 6


@pytest.fixture(scope="package")
def reliability_root(tmp_path_factory, tiny_model_factory):
    """One PEFT adapter of each kind (plus a second LoRA) on the tiny llama."""
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("reliability-adapters")
    for i, kind in enumerate(KINDS):
        make_peft_adapter(base, root / kind, kind, seed=20 + i)
    make_peft_adapter(base, root / "lora2", "lora", seed=31, r=4, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="package")
def greedy_refs(reliability_root, tiny_model_factory):
    """prompts, {adapter name or None: [PEFT greedy tokens per prompt]}."""
    base = tiny_model_factory("llama")
    prompts = [[5, 40, 41, 42], [7, 8, 9, 10, 11, 12], [100, 3, 77]]
    refs = {}
    for name in (None, *KINDS, "lora2"):
        folder = None if name is None else reliability_root / name
        refs[name] = [peft_greedy_reference(base, folder, p, N_NEW)[0] for p in prompts]
    return prompts, refs


@contextlib.contextmanager
def running_server(model_dir, **config):
    """A real server for a whole module (tests.serving's fixture is per test)."""
    gen = start_server_fixture()
    start = next(gen)
    try:
        yield start(model_dir, **config)
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)

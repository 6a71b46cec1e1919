"""Shared fixtures of the reliability suite: adapters of every kind, PEFT references, module-scoped servers."""

from __future__ import annotations

import contextlib

import pytest

from tests.reliability.load import PROMPTS, greedy_references, make_adapters
from tests.serving import start_server_fixture

N_NEW = 6


@pytest.fixture(scope="package")
def reliability_root(tmp_path_factory, tiny_model_factory):
    """One PEFT adapter of each kind (plus a second LoRA) on the tiny llama."""
    return make_adapters(tiny_model_factory("llama"), tmp_path_factory.mktemp("reliability-adapters"))


@pytest.fixture(scope="package")
def greedy_refs(reliability_root, tiny_model_factory):
    """prompts, {adapter name or None: [PEFT greedy tokens per prompt]}."""
    return PROMPTS, greedy_references(tiny_model_factory("llama"), reliability_root, N_NEW)


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

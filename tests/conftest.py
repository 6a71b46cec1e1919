"""Shared fixtures: tiny random models (built once per session, offline)."""

from __future__ import annotations

import os

import pytest
import torch

import server.kernels.runtime  # noqa: F401  (before anything imports triton: CPU runs its interpreter)
from tests.tiny_models import make_tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Return `build(arch="llama", seed=0, **overrides) -> Path`, cached per argument set."""
    cache: dict = {}

    def build(arch: str = "llama", seed: int = 0, **overrides):
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{arch}-{seed}-{abs(hash(key[2])) % 10**8}"
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(name), arch, seed, **overrides)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture
def start_server():
    """start_server(model_dir, **config) -> tests.serving.Running (real server on free ports); stopped at teardown."""
    from tests.serving import start_server_fixture

    yield from start_server_fixture()

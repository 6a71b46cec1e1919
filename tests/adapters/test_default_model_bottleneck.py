"""Bottleneck adapters on the real default model (SmolLM2-135M-Instruct) against AdapterHub's forward pass."""

from __future__ import annotations

import pytest

from server.model.default_model import ensure_default_model
from tests.adapterhub import call_many, greedy_request, make_request
from tests.adapters.default_model import N_NEW, assert_matches, generate_together, start_default


@pytest.mark.slow
def test_pfeiffer_and_houlsby_on_the_default_model_equal_adapterhub(start_server, tmp_path):
    base = ensure_default_model()
    srv, prompt = start_default(start_server, tmp_path)
    names = (None, "pfeiffer", "houlsby")
    answers = call_many([
        make_request(base, tmp_path / "pfeiffer", "SeqBnConfig", seed=1, std=0.05, reduction_factor=16),
        make_request(base, tmp_path / "houlsby", "DoubleSeqBnConfig", seed=2, std=0.05, reduction_factor=16),
        *[greedy_request(base, None if n is None else tmp_path / n, [prompt], N_NEW) for n in names]])
    refs = {n: (a["results"][0]["tokens"], a["results"][0]["logprobs"]) for n, a in zip(names, answers[2:], strict=True)}
    for name, resp in generate_together(srv, prompt, names, register=names[1:]).items():
        assert_matches(resp, refs[name], name)
    assert refs["pfeiffer"][0] != refs[None][0] and refs["houlsby"][0] != refs[None][0]

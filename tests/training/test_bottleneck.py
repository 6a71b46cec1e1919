"""`--method bottleneck`: our own injection trained on a tiny model, saved in AdapterHub's format.

AdapterHub itself (the reference environment, ``.venv-ref``) loads what `training` saved and gives the
same logits as our injected model; the server serves the folder with AdapterHub's greedy tokens and
logprobs; every command that trains weight methods (sft, cpt, dpo, grpo, rloo) trains it; ``--resume``
continues from checkpoints that hold the bottlenecks only.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.adapterhub import call_many, greedy_request, make_request
from tests.training.conftest import first_last, losses, read_metrics, run_cli, train_ok

PLACEMENTS = {  # --placement -> (reduction factor on the tiny llama's hidden 64, AdapterHub's config class, sites)
    "pfeiffer": (16, "SeqBnConfig", ["output_adapters"]),
    "houlsby": (8, "DoubleSeqBnConfig", ["attention_adapters", "output_adapters"]),
}
PROMPTS = ["<|im_start|>user\nwhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n", "the quick brown fox"]
N_NEW = 8


def _sft(tiny, data_dir, out, placement, *extra):
    factor = PLACEMENTS[placement][0]
    return ("sft", "--method", "bottleneck", "--placement", placement, "--reduction-factor", factor, "--model", tiny,
            "--data", data_dir / "sft.jsonl", "--output", out, "--batch-size", 8, "--logging-steps", 3, "--seed", 0,
            "--lr", 1e-2, *extra)


@pytest.fixture(scope="module")
def trained(tiny, data_dir, tmp_path_factory):
    """One adapter per placement, trained once for the module."""
    root = tmp_path_factory.mktemp("bottleneck")
    for placement in PLACEMENTS:
        train_ok(*_sft(tiny, data_dir, root / placement, placement, "--max-steps", 30, "--save-steps", 1000))
    return {placement: root / placement for placement in PLACEMENTS}


@pytest.fixture(scope="module")
def hub(trained, tiny, tmp_path_factory):
    """AdapterHub's answers, from one reference process: its own config file per placement, and on our
    saved folders the last-position logprobs and greedy decoding of the probes."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hub-made")
    prompts = [AutoTokenizer.from_pretrained(str(tiny)).encode(p) for p in PROMPTS]
    requests = [make_request(tiny, root / p, cls, reduction_factor=factor)
                for p, (factor, cls, _) in PLACEMENTS.items()]
    requests += [{"command": "logits", "base_dir": str(tiny), "adapter_dir": str(trained[p]), "prompts": prompts}
                 for p in PLACEMENTS]
    requests += [greedy_request(tiny, trained[p] if p else None, prompts, N_NEW) for p in [None, *PLACEMENTS]]
    answers = call_many(requests)
    n = len(PLACEMENTS)
    return {
        "prompts": prompts,
        "config": {p: json.loads((root / p / "adapter_config.json").read_text()) for p in PLACEMENTS},
        "logprobs": {p: torch.tensor(a["logprobs"]) for p, a in zip(PLACEMENTS, answers[n:2 * n], strict=True)},
        "greedy": {p: [(r["tokens"], r["logprobs"]) for r in a["results"]]
                   for p, a in zip([None, *PLACEMENTS], answers[2 * n:], strict=True)},
    }


def _ours(tiny, adapter_dir, prompts) -> torch.Tensor:
    """Last-position logprobs of our own injected model with the saved bottlenecks, [prompts, vocab]."""
    from transformers import AutoModelForCausalLM

    from training.bottleneck import load_trained

    model = load_trained(AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32), adapter_dir).eval()
    with torch.no_grad():
        return torch.stack([torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1], -1) for p in prompts])


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_loss_decreases(trained, placement):
    first, last = first_last(losses(trained[placement]))
    assert last < first * 0.9, (placement, first, last)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_saved_in_adapterhubs_format(trained, tiny, hub, placement):
    """The two files AdapterHub's save_adapter writes, its config entry for the class, its tensor names."""
    folder = trained[placement]
    factor, _, sites = PLACEMENTS[placement]
    assert {"adapter_config.json", "adapter.safetensors"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "adapter_model.safetensors").exists()
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    ours, theirs = (json.loads((folder / "adapter_config.json").read_text()), hub["config"][placement])
    assert ours["config"] == {**theirs["config"], "init_weights": "mam_adapter"}  # identity at step 0
    assert {k: ours[k] for k in ("hidden_size", "model_class", "model_type", "version")} == \
        {k: theirs[k] for k in ("hidden_size", "model_class", "model_type", "version")}
    tensors = load_file(folder / "adapter.safetensors")
    layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    name = ours["name"]
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"model.layers.{i}.{site}.adapters.{name}.{param}": shape
        for i in range(layers) for site in sites
        for param, shape in [("adapter_down.0.weight", (64 // factor, 64)), ("adapter_down.0.bias", (64 // factor,)),
                             ("adapter_up.weight", (64, 64 // factor)), ("adapter_up.bias", (64,))]
    }


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_adapterhub_loads_it_with_our_logits(trained, tiny, hub, placement):
    ours = _ours(tiny, trained[placement], hub["prompts"])
    assert (ours - hub["logprobs"][placement]).abs().max() < 1e-4
    tokens, base = hub["greedy"][None], hub["greedy"][placement]
    assert any(t[0] != b[0] for t, b in zip(tokens, base, strict=True)), "the adapter must change the greedy output"


def test_server_serves_it_as_adapterhub_computes_it(trained, tiny, hub, start_server):
    """Registered as `--register` does (both placements, one batch with the base): AdapterHub's greedy tokens,
    logprobs within 1e-3."""
    import concurrent.futures

    from adapterserve.v1 import adapterserve_pb2 as pb
    from training.register import register_adapter

    server = start_server(tiny, kv_cache_tokens=4096)
    for placement in PLACEMENTS:
        info = register_adapter(server.app.target, placement, trained[placement])
        assert info.type == pb.BOTTLENECK
    jobs = [(name, i) for name in [None, *PLACEMENTS] for i in range(len(PROMPTS))]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futs = [(name, i, pool.submit(server.generate, token_ids=hub["prompts"][i], adapter_id=name or "",
                                      max_new_tokens=N_NEW, ignore_eos=True, logprobs=True)) for name, i in jobs]
        for name, i, fut in futs:
            got, (tokens, logprobs) = fut.result(), hub["greedy"][name][i]
            assert list(got.token_ids) == tokens, name
            assert max(abs(a.logprob - b) for a, b in zip(got.logprobs, logprobs, strict=True)) < 1e-3, name


def test_every_command_trains_it(tiny, data_dir, reward_model, tmp_path):
    """cpt, dpo, grpo and rloo train the bottlenecks (they move off their zero init) into folders the
    server parses as BOTTLENECK."""
    from server.adapters.formats import AdapterKind, AdapterLimits, load_adapter_dir
    from server.model.weights import read_model_args

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"hello world {i}, the lazy dog."}) for i in range(12)) + "\n")
    runs = {
        "cpt": ("--data", docs, "--max-length", 32, "--placement", "houlsby"),
        "dpo": ("--data", data_dir / "prefs.jsonl"),
        "grpo": ("--data", data_dir / "prompts.jsonl", "--reward-model", reward_model, "--batch-size", 4,
                 "--max-completion-length", 8),
        "rloo": ("--data", data_dir / "prompts.jsonl", "--reward-model", reward_model, "--batch-size", 4,
                 "--max-completion-length", 8, "--beta", 0.05),
    }
    for command, extra in runs.items():
        out = tmp_path / command
        train_ok(command, "--method", "bottleneck", "--model", tiny, "--output", out, "--max-steps", 2, "--lr", 1e-2,
                 "--save-steps", 1000, *extra)
        spec = load_adapter_dir(out, read_model_args(tiny), AdapterLimits())
        assert spec.kind == AdapterKind.BOTTLENECK, command
        ups = [t for k, t in load_file(out / "adapter.safetensors").items() if k.endswith("adapter_up.weight")]
        assert all(t.abs().max() > 0 for t in ups), command


def test_resume_from_checkpoints_holding_the_bottlenecks_only(tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = _sft(tiny, data_dir, out, "houlsby", "--max-steps", 6, "--batch-size", 4, "--save-steps", 3,
                "--logging-steps", 1)
    train_ok(*args)
    full = load_file(out / "adapter.safetensors")
    checkpoint = load_file(out / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert set(checkpoint) == set(full)  # no frozen base weights in the checkpoints
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")  # a crash after step 3
    (out / "adapter.safetensors").unlink()
    capsys.readouterr()
    train_ok(*args, "--resume")
    assert "resuming from" in capsys.readouterr().out
    resumed = load_file(out / "adapter.safetensors")
    for key in full:
        assert (full[key] - resumed[key]).abs().max() < 1e-5, key
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6, 4, 5, 6]


@pytest.mark.parametrize("args, message", [
    (["--method", "bottleneck", "--reduction-factor", "0"], "--reduction-factor must be >= 1, got 0"),
    (["--method", "lora", "--placement", "houlsby"], "--placement applies to --method bottleneck, not lora"),
    (["--method", "bottleneck", "--rank", "4"], "--rank applies to --method lora|dora, not bottleneck"),
])
def test_bad_options(data_dir, tmp_path, capsys, args, message):
    assert run_cli("sft", "--data", data_dir / "sft.jsonl", "--output", tmp_path / "o", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is written

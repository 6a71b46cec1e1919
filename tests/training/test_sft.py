"""`sft` for every adapter kind on a tiny model: loss falls, the folder is a servable PEFT adapter."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.training.conftest import check_generation_adapter, first_last, losses, train_ok

METHOD_ARGS = {
    "lora": ["--rank", 8, "--alpha", 16, "--lr", 3e-3],
    "prompt": ["--num-virtual-tokens", 4, "--lr", 1e-1],
    "ptuning": ["--num-virtual-tokens", 4, "--encoder", "MLP", "--encoder-hidden-size", 32, "--lr", 1e-2],
    "prefix": ["--num-virtual-tokens", 4, "--projection", "--encoder-hidden-size", 32, "--lr", 1e-2],
    "dora": ["--rank", 8, "--alpha", 16, "--lr", 3e-3],
    "ia3": ["--lr", 5e-2],
    "ln_tuning": ["--lr", 5e-2],
}


@pytest.fixture(scope="module")
def trained(tiny, data_dir, tmp_path_factory):
    """One adapter per method, trained once for the module."""
    out = {}
    for method, extra in METHOD_ARGS.items():
        folder = tmp_path_factory.mktemp("sft") / method
        train_ok("sft", "--method", method, "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", folder,
                 "--max-steps", 30, "--batch-size", 8, "--logging-steps", 3, "--save-steps", 1000, "--seed", 0, *extra)
        out[method] = folder
    return out


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_loss_decreases(trained, method):
    first, last = first_last(losses(trained[method]))
    assert last < first * 0.9, (method, first, last)


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_output_is_servable_peft_adapter(trained, tiny, method):
    check_generation_adapter(trained[method], tiny)


def test_saved_tensors_are_what_the_server_reads(trained, tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv_dim = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])
    prompt = load_file(trained["prompt"] / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in prompt.items()} == {"prompt_embeddings": (4, hidden)}
    # P-tuning: the encoder's *output* is saved (no MLP weights).
    ptuning = load_file(trained["ptuning"] / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ptuning.items()} == {"prompt_embeddings": (4, hidden)}
    # Prefix with projection: the projected per-layer K/V, [n, L*2*kv_dim].
    prefix = load_file(trained["prefix"] / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in prefix.items()} == {"prompt_embeddings": (4, layers * 2 * kv_dim)}
    lora = load_file(trained["lora"] / "adapter_model.safetensors")
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in lora)
    config = json.loads((trained["lora"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and not config.get("modules_to_save")
    assert json.loads((trained["ptuning"] / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    assert json.loads((trained["prefix"] / "adapter_config.json").read_text())["prefix_projection"] is True
    dora = load_file(trained["dora"] / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in dora) == len(dora) // 3
    assert json.loads((trained["dora"] / "adapter_config.json").read_text())["use_dora"] is True
    ia3 = load_file(trained["ia3"] / "adapter_model.safetensors")  # PEFT's Llama default: k, v out; down in
    assert {k.split(".")[-2] for k in ia3} == {"k_proj", "v_proj", "down_proj"}
    ln = load_file(trained["ln_tuning"] / "adapter_model.safetensors")
    assert len(ln) == 2 * layers + 1 and all(k.endswith("ln_tuning_layers.weight") for k in ln)


def test_metrics_records_have_step_and_loss(trained):
    records = [json.loads(x) for x in (trained["lora"] / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert train_records[0]["step"] == 1  # logging_first_step
    assert [r["step"] for r in train_records] == sorted(r["step"] for r in train_records)
    assert any("train_runtime" in r for r in records)


def test_prompt_tuning_init_text(tiny, data_dir, tmp_path):
    out = tmp_path / "prompt-text"
    train_ok("sft", "--method", "prompt", "--init-text", "answer with the number", "--num-virtual-tokens", 6,
             "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", out, "--max-steps", 3,
             "--save-steps", 1000)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "answer with the number"
    assert load_file(out / "adapter_model.safetensors")["prompt_embeddings"].shape[0] == 6


def test_ptuning_lstm_encoder(tiny, data_dir, tmp_path):
    out = tmp_path / "lstm"
    train_ok("sft", "--method", "ptuning", "--encoder", "LSTM", "--encoder-hidden-size", 16, "--num-virtual-tokens",
             3, "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", out, "--max-steps", 3,
             "--save-steps", 1000)
    assert json.loads((out / "adapter_config.json").read_text())["encoder_reparameterization_type"] == "LSTM"
    assert set(load_file(out / "adapter_model.safetensors")) == {"prompt_embeddings"}


def _reply_loss(base, adapter_dir, pairs) -> float:
    """Mean NLL of the reply tokens given the chat-formatted question, through PeftModel.from_pretrained."""
    import torch
    from transformers import AutoTokenizer

    from tests.peft_reference import load_reference_model

    tok = AutoTokenizer.from_pretrained(str(base))
    model = load_reference_model(base, adapter_dir)
    total, count = 0.0, 0
    for question, reply in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids, r_ids = tok.encode(prompt), tok.encode(reply + "<|im_end|>")
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -len(r_ids) - 1:-1]  # [len(reply), vocab]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(r_ids), reduction="sum").item()
        count += len(r_ids)
    return total / count


@pytest.mark.parametrize("method", ["ptuning", "prefix"])
def test_reparameterised_prompts_are_saved_as_the_encoder_output(trained, tiny, method):
    """Loaded from disk (no encoder), the adapter keeps what training learned: the saved tensor is the
    MLP's output, not its input (which would score like a random prompt)."""
    pairs = [(f"what is {a} plus {b}?", f"ANSWER: {a + b}") for a, b in [(1, 2), (4, 4), (7, 1), (3, 5)]]
    base_loss = _reply_loss(tiny, None, pairs)
    adapter_loss = _reply_loss(tiny, trained[method], pairs)
    assert adapter_loss < base_loss * 0.9, (base_loss, adapter_loss)

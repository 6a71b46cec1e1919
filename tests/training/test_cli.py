"""CLI surface: --help everywhere, --config YAML equivalent to flags, clear option errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.training.conftest import run_cli, train_ok
from training.__main__ import COMMANDS, parse


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    assert run_cli(*([command] if command else []), "--help") == 0
    out = capsys.readouterr().out
    assert "usage: python -m training" in out
    if command:
        assert "--config FILE.yaml" in out and "--output" in out and "--resume" in out and "--seed" in out


def test_sft_help_lists_every_method_option(capsys):
    run_cli("sft", "--help")
    out = capsys.readouterr().out
    for flag in ("--method {lora,prompt,ptuning,prefix,dora,ia3,ln_tuning,bottleneck}", "--rank", "--alpha",
                 "--target-modules", "--dropout", "--num-virtual-tokens", "--init-text", "--encoder {MLP,LSTM}",
                 "--encoder-hidden-size", "--projection", "--reduction-factor", "--placement {pfeiffer,houlsby}",
                 "--register", "--adapter-id"):
        assert flag in out, flag


FLAGS = ["--method", "ptuning", "--model", "some/model", "--data", "d.jsonl", "--output", "out", "--lr", "0.0001",
         "--max-steps", "7", "--encoder", "LSTM", "--encoder-hidden-size", "64", "--num-virtual-tokens", "5",
         "--no-completion-only-loss", "--seed", "3"]
YAML = """
method: ptuning
model: some/model
data: d.jsonl
output: out
lr: 1e-4            # PyYAML reads this as a string; it is converted like the flag
max-steps: 7
encoder: LSTM
encoder_hidden_size: 64
num-virtual-tokens: 5
completion_only_loss: false
seed: 3
"""


def test_yaml_equals_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    assert parse(["sft", *FLAGS]) == parse(["sft", "--config", str(path)])


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    _, cfg = parse(["sft", "--config", str(path), "--max-steps", "9", "--completion-only-loss"])
    assert cfg.max_steps == 9 and cfg.completion_only_loss is True and cfg.encoder == "LSTM"


def test_target_modules_list_or_commas(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("target_modules: [q_proj, v_proj]\n")
    assert parse(["sft", "--config", str(path)])[1].target_modules == ["q_proj", "v_proj"]
    assert parse(["sft", "--target-modules", "q_proj,v_proj"])[1].target_modules == ["q_proj", "v_proj"]


def test_written_config_is_accepted_back(tiny, data_dir, tmp_path):
    """training_config.yaml in the output folder reproduces the run: same seed -> same adapter, bit for bit."""
    first = tmp_path / "a"
    train_ok("sft", "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", first, "--max-steps", 4,
             "--lr", 3e-3, "--save-steps", 1000, "--seed", 5)
    config = yaml.safe_load((first / "training_config.yaml").read_text())
    assert config["command"] == "sft" and config["seed"] == 5
    second = tmp_path / "b"
    train_ok("sft", "--config", first / "training_config.yaml", "--output", second)
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("content, message", [
    ("bogus_option: 1\n", "unknown option 'bogus_option'"),
    ("max_steps: ten\n", "max_steps:"),
    ("method: lorax\n", "expected one of lora, prompt, ptuning, prefix"),
    ("- a\n- b\n", "expected a mapping"),
    ("command: dpo\n", "written for command 'dpo', not 'sft'"),
])
def test_bad_yaml(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert run_cli("sft", "--config", path) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "lora", "--init-text", "hi"], "--init-text applies to --method prompt, not lora"),
    (["--method", "prompt", "--rank", "4"], "--rank applies to --method lora|dora, not prompt"),
    (["--method", "prefix", "--encoder", "LSTM"], "--encoder applies to --method ptuning, not prefix"),
    ([], "--data is required"),
    (["--data", "x.jsonl"], "--output is required"),
    (["--max-steps", "1.5"], "--max-steps: expected an integer"),
])
def test_bad_options(tmp_path, capsys, args, message):
    assert run_cli("sft", *args) == 2
    assert message in capsys.readouterr().err


def test_bad_flag_value_is_argparse_error(capsys):
    assert run_cli("sft", "--method", "nope") == 2
    assert "invalid choice" in capsys.readouterr().err


def test_register_target_checked_before_training(data_dir, tmp_path, capsys):
    assert run_cli("sft", "--data", data_dir / "sft.jsonl", "--output", tmp_path / "o", "--register", "nohost") == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


@pytest.mark.parametrize("name", ["sft_lora.yaml", "grpo.yaml"])
def test_example_configs_parse(name):
    command = yaml.safe_load((CONFIGS / name).read_text())["command"]
    _, cfg = parse([command, "--config", str(CONFIGS / name)])
    assert cfg.data and cfg.output


@pytest.mark.parametrize("name, kind", [("multi_gpu.yaml", "MULTI_GPU"), ("zero2.yaml", "DEEPSPEED"),
                                        ("zero3.yaml", "DEEPSPEED"), ("fsdp.yaml", "FSDP")])
def test_accelerate_configs(name, kind):
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["distributed_type"] == kind and config["num_processes"] >= 1
    if kind == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] == (3 if "zero3" in name else 2)

"""Fixtures for the training tests: tiny data files and an in-process `python -m training` runner."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from training.__main__ import main


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written as-is) one per line."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(folder: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(folder) if key in r]


def run_cli(*args: str) -> int:
    """`python -m training ARGS` in-process; returns the exit code (SystemExit from argparse included)."""
    import torch

    torch.set_num_threads(1)  # a server started in this process (start_server) sets 2; see one_torch_thread
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help (0) or bad flags (2)
        return int(e.code or 0)


def train_ok(*args: str) -> None:
    code = run_cli(*args)
    assert code == 0, f"python -m training {' '.join(map(str, args))} exited {code}"


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and spinning OpenMP workers on a shared 2-core
    box made each step ~30x slower (the tests' torch is loaded before OMP_WAIT_POLICY could be set)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Small, easy datasets for the tiny model (a fixed reply format; a format preference)."""
    root = tmp_path_factory.mktemp("training-data")
    rng = random.Random(0)
    sft = []
    for i in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if i % 3 == 0:
            sft.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                     {"role": "assistant", "content": f"ANSWER: {a + b}"}]})
        else:
            sft.append({"prompt": f"what is {a} plus {b}?", "completion": f"ANSWER: {a + b}"})
    write_jsonl(root / "sft.jsonl", sft)
    prefs = []
    for _ in range(40):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prefs.append({"prompt": f"what is {a} plus {b}?", "chosen": f"ANSWER: {a + b}",
                      "rejected": rng.choice(["hmm, no idea, maybe something? who knows.",
                                              "the lazy dog, the lazy dog, the lazy dog",
                                              "well well well, I think so, perhaps not"])})
    write_jsonl(root / "prefs.jsonl", prefs)
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"what is {i} plus {i}?"} for i in range(8)])
    docs = [f"the quick brown fox {i} jumps over the lazy dog. hello world number {i}." for i in range(24)]
    (root / "text.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def reward_model(tiny, data_dir, tmp_path_factory) -> Path:
    """A reward model trained once on the tiny model (used by the reward, GRPO and RLOO tests)."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    train_ok("reward", "--model", tiny, "--data", data_dir / "prefs.jsonl", "--output", out, "--max-steps", 30,
             "--lr", 3e-3, "--eval-fraction", 0.25, "--save-steps", 1000, "--seed", 0)
    return out


PROBES = ["<|im_start|>user\nwhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n", "the quick brown fox"]


def check_generation_adapter(folder: Path, base: Path) -> None:
    """The folder is a servable PEFT adapter: two files, safetensors only, PEFT loads it, output changes."""
    from transformers import AutoTokenizer

    from tests.peft_reference import peft_greedy_reference

    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")], list(folder.iterdir())
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_metrics(folder)
    # Greedy decoding through PeftModel.from_pretrained's forward (the oracle the server is checked
    # against; PeftModel.generate ignores prefix-tuning prefixes with transformers 5.24 + peft 0.21).
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    prompts = [tokenizer.encode(p) for p in PROBES]
    base_out = [peft_greedy_reference(base, None, ids, 6)[0] for ids in prompts]
    tuned_out = [peft_greedy_reference(base, folder, ids, 6)[0] for ids in prompts]
    assert tuned_out != base_out, "the adapter must change the greedy output"
    # The server's own parser accepts it (same checks as RegisterAdapter).
    formats = pytest.importorskip("server.adapters.formats")
    from server.model.config import ModelArgs

    model_args = ModelArgs.from_hf_config(json.loads((base / "config.json").read_text()))
    formats.load_adapter_dir(folder, model_args, formats.AdapterLimits())


def first_last(values: list[float]) -> tuple[float, float]:
    assert len(values) >= 3, values
    return values[0], values[-1]

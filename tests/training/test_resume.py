"""--resume continues from the last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file

from tests.training.conftest import read_metrics, run_cli, train_ok


def _args(tiny, data_dir, out, *extra):
    return ("sft", "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", out, "--max-steps", 8,
            "--batch-size", 4, "--save-steps", 4, "--logging-steps", 1, "--lr", 3e-3, "--seed", 0, *extra)


def test_resume_reproduces_the_uninterrupted_run(tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_ok(*_args(tiny, data_dir, out))
    full = load_file(out / "adapter_model.safetensors")
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]

    # Simulate a crash after step 4: the last checkpoint and the final adapter never got written.
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")
    (out / "adapter_model.safetensors").unlink()
    capsys.readouterr()
    train_ok(*_args(tiny, data_dir, out, "--resume"))
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-4'}" in capsys.readouterr().out

    resumed = load_file(out / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:  # same data order, RNG and optimiser state -> the same weights
        assert (full[key] - resumed[key]).abs().max() < 1e-5, key
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 9)) + list(range(5, 9))  # metrics.jsonl kept; steps 5-8 logged again


def test_resume_without_checkpoint_starts_fresh(tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert run_cli(*_args(tiny, data_dir, out, "--resume", "--max-steps", 2)) == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()


def test_fresh_run_clears_stale_results(tiny, data_dir, tmp_path):
    out = tmp_path / "again"
    train_ok(*_args(tiny, data_dir, out, "--max-steps", 4))
    train_ok(*_args(tiny, data_dir, out, "--max-steps", 2, "--save-steps", 100))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert not list((out / "checkpoints").glob("checkpoint-4"))

"""``grpo`` / ``rloo``: online RLHF of a LoRA policy against a trained reward model.

Each step samples ``--num-generations`` completions per prompt from the policy, scores every
(prompt, completion) with the reward model trained by ``python -m training reward`` and updates
the policy with group-relative (GRPO) or leave-one-out (RLOO) advantages.
Trainers: TRL ``GRPOTrainer`` / ``RLOOTrainer`` with a LoRA ``peft_config``; the reward model is
passed as a ``PreTrainedModel`` reward function (its LoRA merged into the base once, at load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.cli import UsageError, explicit_fields
from training.config import OnlineRLArgs, default_lr
from training.data import prompts_to_trl, read_prompts
from training.methods import check_method_options, trainer_model
from training.runtime import (
    callbacks,
    check_options,
    finish,
    load_tokenizer,
    resolve_model,
    say,
    start_model_run,
    train,
    training_arguments,
)


def reward_model_base(folder: str | Path) -> str:
    """Check ``folder`` is a reward-model adapter (``SEQ_CLS``); return its base model path."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise UsageError(f"--reward-model {folder}: no adapter_config.json (train one with `python -m training reward`)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("task_type") != "SEQ_CLS":
        raise UsageError(f"--reward-model {folder}: task_type is {config.get('task_type')!r}, not a reward model "
                         "(SEQ_CLS)")
    return config["base_model_name_or_path"]


def load_reward_model(folder: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(reward model with its LoRA merged, its tokenizer), in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = resolve_model(reward_model_base(folder))
    tokenizer = load_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=getattr(torch, dtype), pad_token_id=tokenizer.pad_token_id,
    )
    model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    model.eval()
    return model, tokenizer


def run(cfg: OnlineRLArgs, command: str = "grpo") -> int:
    """Validate prompts and reward model, train the policy with GRPO or RLOO, export/register it."""
    if not cfg.reward_model:
        raise UsageError("--reward-model is required (a folder written by `python -m training reward`)")
    check_method_options(cfg.method, explicit_fields(cfg), cfg)
    check_options(cfg)
    prompts = read_prompts(cfg.data)
    reward_model_base(cfg.reward_model)
    if cfg.num_generations < 2:
        raise UsageError(f"--num-generations must be >= 2 (advantages compare a group), got {cfg.num_generations}")
    if (cfg.batch_size * cfg.grad_accum) % cfg.num_generations:
        raise UsageError(f"--batch-size x --grad-accum ({cfg.batch_size * cfg.grad_accum}) must be a multiple of "
                         f"--num-generations ({cfg.num_generations})")
    run_, tokenizer = start_model_run(cfg, command)
    chat = tokenizer.chat_template is not None
    common = training_arguments(run_, cfg.lr if cfg.lr is not None else default_lr(command, cfg.method))
    reward_model, reward_tokenizer = load_reward_model(cfg.reward_model, common["model_init_kwargs"]["dtype"])

    from datasets import Dataset

    if command == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    model, peft_config = trainer_model(run_, common)
    say(f"{command}: {len(prompts)} prompts x {cfg.num_generations} completions, reward model {cfg.reward_model}")
    args = Config(
        **common, num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta,
    )
    trainer = Trainer(
        model=model,
        reward_funcs=reward_model,
        args=args,
        train_dataset=Dataset.from_list(prompts_to_trl(prompts, chat)),
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(run_),
    )
    train(run_, trainer)
    return finish(run_)


def run_rloo(cfg: OnlineRLArgs) -> int:
    """``rloo``: the same as ``grpo`` with RLOO's leave-one-out baseline."""
    return run(cfg, "rloo")

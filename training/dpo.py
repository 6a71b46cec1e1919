"""``dpo``: offline RLHF, direct preference optimisation of a LoRA policy.

Data: preference pairs ``{"prompt", "chosen", "rejected"}``. The reference policy is the base
model itself (PEFT disables the adapter for the reference pass, so no second copy is loaded; with
``--method bottleneck`` TRL loads the base a second time as the reference).
Trainer: TRL ``DPOTrainer`` with a LoRA ``peft_config``.
"""

from __future__ import annotations

from training.cli import explicit_fields
from training.config import DPOArgs, default_lr
from training.data import holdout_split, preferences_to_trl, read_preferences
from training.methods import check_method_options, trainer_model
from training.runtime import (
    callbacks,
    check_options,
    finish,
    say,
    start_model_run,
    train,
    training_arguments,
)


def run(cfg: DPOArgs) -> int:
    """Validate the pairs, train the DPO LoRA policy, export and optionally register it."""
    check_method_options(cfg.method, explicit_fields(cfg), cfg)
    check_options(cfg)
    pairs = read_preferences(cfg.data)
    train_rows, eval_rows = holdout_split(pairs, cfg.eval_fraction, cfg.seed) if cfg.eval_fraction > 0 else (pairs, [])
    run_, tokenizer = start_model_run(cfg, "dpo")
    chat = tokenizer.chat_template is not None

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    lr = cfg.lr if cfg.lr is not None else default_lr("dpo", cfg.method)
    say(f"dpo: {len(train_rows)} pairs, beta {cfg.beta}, loss {cfg.loss_type}, model {run_.model_path}")
    common = training_arguments(run_, lr)
    model, peft_config = trainer_model(run_, common)
    args = DPOConfig(**common, beta=cfg.beta, loss_type=[cfg.loss_type],
                     max_length=cfg.max_length, eval_strategy="no")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(preferences_to_trl(train_rows, chat)),
        eval_dataset=Dataset.from_list(preferences_to_trl(eval_rows, chat)) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(run_),
    )
    train(run_, trainer)
    if eval_rows:
        metrics = trainer.evaluate()
        say(f"held-out preference accuracy: {metrics.get('eval_rewards/accuracies', float('nan')):.3f}")
    return finish(run_)

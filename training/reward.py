"""``reward``: a reward model = LoRA + a score head on ``AutoModelForSequenceClassification``.

Data: preference pairs ``{"prompt", "chosen", "rejected"}``. A held-out split (``--eval-fraction``)
measures pairwise accuracy (share of pairs scored chosen > rejected) before and after training.
Trainer: TRL ``RewardTrainer`` with a ``SEQ_CLS`` LoRA config (PEFT saves the score head too).
The folder is what ``grpo``/``rloo --reward-model`` load; it is not a servable generation adapter.
"""

from __future__ import annotations

from training.cli import UsageError
from training.config import RewardArgs, default_lr
from training.data import holdout_split, preferences_to_trl, read_preferences
from training.methods import lora_config
from training.runtime import (
    callbacks,
    check_options,
    finish,
    say,
    start_model_run,
    train,
    training_arguments,
)


def run(cfg: RewardArgs) -> int:
    """Validate the pairs, train the reward model, report held-out pairwise accuracy."""
    if cfg.register:
        raise UsageError("--register: a reward model is not a generation adapter; the server cannot serve it")
    check_options(cfg)
    pairs = read_preferences(cfg.data)
    train_rows, eval_rows = holdout_split(pairs, cfg.eval_fraction, cfg.seed)
    run_, tokenizer = start_model_run(cfg, "reward")
    chat = tokenizer.chat_template is not None

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    lr = cfg.lr if cfg.lr is not None else default_lr("reward", "lora")
    say(f"reward: {len(train_rows)} training pairs, {len(eval_rows)} held out, model {run_.model_path}")
    common = training_arguments(run_, lr)
    common["model_init_kwargs"]["pad_token_id"] = tokenizer.pad_token_id
    args = RewardConfig(**common, max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards,
                        eval_strategy="no")
    trainer = RewardTrainer(
        model=run_.model_path,
        args=args,
        train_dataset=Dataset.from_list(preferences_to_trl(train_rows, chat)),
        eval_dataset=Dataset.from_list(preferences_to_trl(eval_rows, chat)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg, task_type="SEQ_CLS"),
        callbacks=callbacks(run_),
    )
    before = trainer.evaluate()
    train(run_, trainer)
    after = trainer.evaluate()
    say(f"held-out pairwise accuracy: {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f} "
        f"({len(eval_rows)} pairs)")
    return finish(run_)

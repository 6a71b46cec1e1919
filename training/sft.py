"""``sft``: supervised fine-tuning of an adapter of any ``--method`` (LoRA, DoRA, IA3, LN tuning, prompt
tuning, P-tuning, prefix tuning, bottleneck).

Data: chat ``{"messages": [...]}`` or ``{"prompt", "completion"}`` JSONL, rendered with the base
tokenizer's chat template; loss on the reply tokens only unless ``--no-completion-only-loss``.
Trainer: TRL ``SFTTrainer`` with a ``peft_config``, or the model with bottlenecks injected (so ``accelerate
launch`` scales it out).
"""

from __future__ import annotations

from training.cli import explicit_fields
from training.config import SFTArgs, default_lr
from training.data import read_sft, sft_to_trl
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


def run(cfg: SFTArgs) -> int:
    """Validate the data, train the adapter, export it (and register it when asked)."""
    check_method_options(cfg.method, explicit_fields(cfg), cfg)
    check_options(cfg)
    rows = read_sft(cfg.data)  # before any model work: bad lines fail fast
    run_, tokenizer = start_model_run(cfg, "sft")
    chat = bool(cfg.chat_template and tokenizer.chat_template)
    examples = sft_to_trl(rows, chat, cfg.data)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lr = cfg.lr if cfg.lr is not None else default_lr("sft", cfg.method)
    say(f"sft --method {cfg.method}: {len(examples)} examples, model {run_.model_path}, lr {lr}")
    common = training_arguments(run_, lr)
    model, peft_config = trainer_model(run_, common)
    args = SFTConfig(
        **common,
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss,
        packing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(run_),
    )
    train(run_, trainer)
    return finish(run_)

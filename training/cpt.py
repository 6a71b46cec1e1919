"""``cpt``: continued pre-training of an adapter (``--method`` lora, dora, ia3, ln_tuning, bottleneck) on raw
domain text.

Data: ``.txt`` (documents separated by blank lines) or ``.jsonl`` ``{"text": ...}``. Documents
are packed into ``--max-length`` token blocks and the loss covers every token.
Trainer: TRL ``SFTTrainer`` on a language-modelling dataset with ``packing=True``.
"""

from __future__ import annotations

from training.cli import explicit_fields
from training.config import CPTArgs, default_lr
from training.data import read_text
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


def run(cfg: CPTArgs) -> int:
    """Validate the text, train a LoRA on it (packed, all tokens), export and optionally register."""
    check_method_options(cfg.method, explicit_fields(cfg), cfg)
    check_options(cfg)
    docs = read_text(cfg.data)
    eval_docs = read_text(cfg.eval_data) if cfg.eval_data else None
    run_, tokenizer = start_model_run(cfg, "cpt")

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lr = cfg.lr if cfg.lr is not None else default_lr("cpt", cfg.method)
    say(f"cpt --method {cfg.method}: {len(docs)} documents, blocks of {cfg.max_length} tokens, model {run_.model_path}")
    common = training_arguments(run_, lr)
    model, peft_config = trainer_model(run_, common)
    args = SFTConfig(
        **common,
        dataset_text_field="text",
        max_length=cfg.max_length,
        packing=True,
        packing_strategy=cfg.packing_strategy,
        completion_only_loss=False,
        eval_strategy="no",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(docs),
        eval_dataset=Dataset.from_list(eval_docs) if eval_docs else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(run_),
    )
    before = trainer.evaluate() if eval_docs else None
    train(run_, trainer)
    if before is not None:
        after = trainer.evaluate()
        say(f"held-out loss ({cfg.eval_data}): {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
    return finish(run_)

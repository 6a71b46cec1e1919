"""What every command shares: output folder, base model, TrainingArguments, train/resume, export.

Output folder layout (``--output DIR``)::

    DIR/adapter_config.json        the PEFT adapter, exactly what the server registers
    DIR/adapter_model.safetensors  (--method bottleneck: AdapterHub's adapter_config.json + adapter.safetensors)
    DIR/metrics.jsonl              one JSON record per Trainer log
    DIR/loss.png                   loss curve (+ reward / accuracy when logged)
    DIR/training_config.yaml       the resolved options; `--config` accepts it back
    DIR/checkpoints/checkpoint-N/  Trainer checkpoints for --resume
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.cli import UsageError, to_yaml
from training.config import CommonArgs
from training.metrics import METRICS_FILE, PLOT_FILE, MetricsCallback
from training.register import ADAPTER_FILES, ADAPTERHUB_FILES, adapter_files, check_target, register_adapter

log = logging.getLogger("adapterserve.training")
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "training_config.yaml"


@dataclass
class Run:
    """One training run: its options, output folder and base model."""

    cfg: Any
    command: str
    output: Path
    model_path: str = ""
    adapter_id: str = ""

    @property
    def checkpoints(self) -> Path:
        return self.output / CHECKPOINTS


def _is_main() -> bool:
    """Rank 0 of a launch (torchrun / accelerate / MPI), read from the environment.

    Deliberately not ``accelerate.PartialState()``: created before the Trainer's arguments it would
    fix the distributed state too early (e.g. a multi-process CPU launch would run as N single runs).
    """
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


def say(message: str) -> None:
    """Print a progress line on the main process only."""
    if _is_main():
        print(f"[training] {message}", flush=True)


def check_options(cfg: CommonArgs) -> None:
    """Options every command needs, checked before the data is read or any model loaded."""
    if not cfg.data:
        raise UsageError("--data is required (or 'data:' in --config)")
    if not cfg.output:
        raise UsageError("--output is required (or 'output:' in --config)")
    for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps", "save_total_limit"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps == 0 or (cfg.max_steps < 0 and cfg.epochs <= 0):
        raise UsageError("nothing to train: set --max-steps > 0 or --epochs > 0")
    if cfg.register:
        check_target(cfg.register, adapter_id_for(cfg))


def adapter_id_for(cfg: CommonArgs) -> str:
    """``--adapter-id``, or the output folder's name."""
    return cfg.adapter_id or Path(cfg.output or ".").resolve().name


def start_run(cfg: CommonArgs, command: str) -> Run:
    """Prepare the output folder (cleared of stale results unless --resume); write the resolved config."""
    check_options(cfg)
    output = Path(cfg.output)
    run = Run(cfg=cfg, command=command, output=output, adapter_id=adapter_id_for(cfg) if cfg.register else "")
    # Rank 0 prepares the folder; the other ranks write nothing before the Trainer's first
    # collective operation, so no barrier is needed here.
    if _is_main():
        output.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            for name in (*ADAPTER_FILES, *ADAPTERHUB_FILES, METRICS_FILE, PLOT_FILE):
                (output / name).unlink(missing_ok=True)
            shutil.rmtree(run.checkpoints, ignore_errors=True)
        (output / CONFIG_FILE).write_text(to_yaml(cfg, command), encoding="utf-8")
    return run


def start_model_run(cfg: CommonArgs, command: str) -> tuple[Run, Any]:
    """:func:`start_run`, then resolve ``--model`` into ``run.model_path`` and load its tokenizer."""
    run = start_run(cfg, command)
    run.model_path = resolve_model(cfg.model)
    return run, load_tokenizer(run.model_path)


def resolve_model(name: str) -> str:
    """``default`` -> the converted SmolLM2-135M-Instruct folder; a local folder -> itself.

    Anything else is passed on to transformers as a Hub id (which needs network access).
    """
    if name == "default":
        from server.model.default_model import ensure_default_model

        return str(ensure_default_model())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or path.exists():
        raise UsageError(f"--model {name}: no such model folder")
    return name


def load_tokenizer(model_path: str) -> Any:
    """The base model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype_and_bf16(cfg: CommonArgs) -> tuple[str, bool]:
    import torch

    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda_bf16
    if cfg.dtype != "auto":
        return cfg.dtype, bf16
    return "float32", bf16  # fp32 master weights; bf16 autocast on GPUs that support it


def training_arguments(run: Run, lr: float) -> dict[str, Any]:
    """Keyword arguments shared by every TRL config (all are ``TrainingArguments`` fields)."""
    import torch

    cfg = run.cfg
    dtype, bf16 = _dtype_and_bf16(cfg)
    return dict(
        output_dir=str(run.checkpoints),
        seed=cfg.seed,
        data_seed=cfg.seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=cfg.gradient_checkpointing,
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also makes a multi-process CPU launch (torchrun) distributed
        model_init_kwargs={"dtype": dtype},
    )


def callbacks(run: Run) -> list[Any]:
    """Callbacks every trainer gets (metrics.jsonl + loss.png)."""
    return [MetricsCallback(run.output)]


def last_checkpoint(run: Run) -> str | None:
    """The checkpoint ``--resume`` continues from, or None (fresh start)."""
    if not run.cfg.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(run.checkpoints)) if run.checkpoints.is_dir() else None
    say(f"resuming from {found}" if found else f"--resume: no checkpoint in {run.checkpoints}, starting fresh")
    return found


def train(run: Run, trainer: Any) -> Any:
    """Train (resuming when asked), then export the adapter into the output folder."""
    result = trainer.train(resume_from_checkpoint=last_checkpoint(run))
    export_adapter(run, trainer)
    return result


def export_adapter(run: Run, trainer: Any) -> Path:
    """Save the adapter via the Trainer (gathers sharded weights), keep only the two PEFT files (or write
    AdapterHub's two files for ``--method bottleneck``)."""
    final = run.checkpoints / "final"
    trainer.save_model(str(final))
    cfg = run.cfg
    if trainer.is_world_process_zero() and getattr(cfg, "method", None) == "bottleneck":
        from training import bottleneck

        bottleneck.export_adapterhub(final, run.output, cfg.placement, cfg.reduction_factor,
                                     bottleneck.adapter_name(run.output), run.model_path)
        shutil.rmtree(final, ignore_errors=True)
    elif trainer.is_world_process_zero():
        for name in ADAPTER_FILES:
            if not (final / name).is_file():
                raise RuntimeError(f"the trainer did not write {name} (is the model a PEFT model?)")
            shutil.copy2(final / name, run.output / name)
        shutil.rmtree(final, ignore_errors=True)
        stray = sorted(p.name for p in run.output.glob("*.bin"))
        if stray:
            raise RuntimeError(f"unexpected pickle files in {run.output}: {stray}")
    trainer.accelerator.wait_for_everyone()
    return run.output


def finish(run: Run) -> int:
    """Report where the adapter is and register it with a server when ``--register`` was given."""
    if not _is_main():
        return 0
    say(f"adapter saved: {run.output}/{{{','.join(adapter_files(run.output))}}}; metrics: {run.output / METRICS_FILE}")
    cfg = run.cfg
    if not cfg.register:
        return 0
    import grpc

    try:
        adapter = register_adapter(
            cfg.register, run.adapter_id, run.output, replace=cfg.register_replace,
            token=cfg.register_token, tls_ca=cfg.register_tls_ca,
        )
    except grpc.RpcError as e:
        print(f"error: registering {run.adapter_id!r} with {cfg.register} failed: {e.code().name}: {e.details()}"
              f" (the adapter is saved in {run.output})", file=sys.stderr, flush=True)
        return 1
    say(f"registered {adapter.adapter_id!r} with {cfg.register} (type {adapter.type}, {adapter.size_bytes} bytes)")
    return 0

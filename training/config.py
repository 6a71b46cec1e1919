"""Typed run configurations, one dataclass per command.

Every field is one command-line flag (``max_steps`` = ``--max-steps``) and one key of a
``--config FILE.yaml`` (``max_steps:`` or ``max-steps:``). Precedence: flag > YAML > default.
This module imports nothing heavy so that ``--help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its flag help (and optional ``choices``) in the metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class CommonArgs:
    """Options every command takes: model, data, output, optimisation, checkpoints, registration."""

    model: str = opt("default", "Base model: 'default' (SmolLM2-135M-Instruct, converted once) or a local HF folder.")
    data: str | None = opt(None, "Training data file (format depends on the command). Required.")
    output: str | None = opt(None, "Output folder: the PEFT adapter, metrics.jsonl, loss.png, checkpoints/. Required.")
    seed: int = opt(42, "Random seed (data order, adapter init, sampling).")
    epochs: float = opt(3.0, "Training epochs (ignored when --max-steps > 0).")
    max_steps: int = opt(-1, "Stop after this many optimiser steps (-1 = run --epochs).")
    batch_size: int = opt(8, "Examples per device per step.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    lr: float | None = opt(None, "Learning rate (default: a per-method value, printed at start).")
    lr_scheduler: str = opt("linear", "Learning-rate schedule.", choices=["linear", "cosine", "constant", "constant_with_warmup"])
    warmup: float = opt(0.0, "Warm-up: steps (>= 1) or a fraction of all steps (< 1).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_length: int = opt(512, "Longest tokenised example (or packed block) in tokens.")
    logging_steps: int = opt(5, "Log loss and metrics every N steps (to metrics.jsonl and the progress bar).")
    save_steps: int = opt(100, "Write a checkpoint to OUTPUT/checkpoints every N steps.")
    save_total_limit: int = opt(2, "Keep at most this many checkpoints.")
    resume: bool = opt(False, "Resume from the last checkpoint in OUTPUT/checkpoints (fresh start when there is none).")
    dtype: str = opt("auto", "Weights dtype (auto: float32 on CPU, bfloat16 on a bf16 GPU).",
                     choices=["auto", "float32", "bfloat16", "float16"])
    bf16: bool | None = opt(None, "bf16 mixed precision (default: on when the GPU supports it, off on CPU).")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory (recompute activations).")
    register: str | None = opt(None, "HOST:PORT of a running adapterserve server to register the result with.")
    adapter_id: str | None = opt(None, "Adapter id for --register (default: the output folder's name).")
    register_replace: bool = opt(False, "With --register: replace an adapter registered under the same id.")
    register_token: str | None = opt(None, "Bearer token for --register (the admin token if the server sets one; default: $ADAPTERSERVE_TOKEN).")
    register_tls_ca: str | None = opt(None, "PEM CA bundle: register over TLS.")


@dataclass
class LoraArgs:
    """LoRA options (``--method lora`` and every RLHF command)."""

    rank: int = opt(8, "LoRA rank r.")
    alpha: float = opt(16.0, "LoRA alpha (scaling = alpha / rank).")
    target_modules: list[str] = opt(DEFAULT_TARGET_MODULES, "Comma-separated module names LoRA adapts.")
    dropout: float = opt(0.05, "LoRA dropout.")
    use_rslora: bool = opt(False, "rsLoRA scaling alpha / sqrt(rank).")


@dataclass
class PromptLearningArgs:
    """Options of the prompt-learning methods (prompt tuning, P-tuning, prefix tuning)."""

    num_virtual_tokens: int = opt(16, "Virtual tokens (prompt, ptuning, prefix).")
    init_text: str | None = opt(None, "Prompt tuning: initialise the virtual tokens from this text's embeddings.")
    encoder: str = opt("MLP", "P-tuning prompt encoder.", choices=["MLP", "LSTM"])
    encoder_hidden_size: int = opt(128, "Hidden size of the P-tuning encoder / the prefix projection MLP.")
    projection: bool = opt(False, "Prefix tuning: reparameterise the prefix through an MLP.")


@dataclass
class BottleneckArgs:
    """Options of ``--method bottleneck`` (AdapterHub's sequential bottleneck adapters)."""

    reduction_factor: int = opt(16, "Bottleneck: width = hidden size / this factor.")
    placement: str = opt("pfeiffer", "Bottleneck: pfeiffer = after each MLP (AdapterHub SeqBnConfig, ReLU); "
                         "houlsby = after attention and after the MLP (DoubleSeqBnConfig, swish).",
                         choices=["pfeiffer", "houlsby"])


# Methods that adapt the model (every command but reward can train them); SFT also trains the prompt kinds.
WEIGHT_METHODS = ["lora", "dora", "ia3", "ln_tuning", "bottleneck"]
SFT_METHODS = ["lora", "prompt", "ptuning", "prefix", "dora", "ia3", "ln_tuning", "bottleneck"]
METHOD_OPTIONS = {  # method -> option fields that only it uses (checked when set to a non-default value)
    "lora": ["rank", "alpha", "target_modules", "dropout", "use_rslora"],
    "dora": ["rank", "alpha", "target_modules", "dropout", "use_rslora"],
    "ia3": [],
    "ln_tuning": [],
    "bottleneck": ["reduction_factor", "placement"],
    "prompt": ["num_virtual_tokens", "init_text"],
    "ptuning": ["num_virtual_tokens", "encoder", "encoder_hidden_size"],
    "prefix": ["num_virtual_tokens", "projection", "encoder_hidden_size"],
}
DEFAULT_LR = {"lora": 2e-4, "prompt": 3e-2, "ptuning": 3e-3, "prefix": 1e-2, "dora": 2e-4, "ia3": 5e-3,
              "ln_tuning": 5e-3, "bottleneck": 1e-3}


@dataclass
class SFTArgs(CommonArgs, LoraArgs, PromptLearningArgs, BottleneckArgs):
    """``sft``: supervised fine-tuning on chat or prompt/completion JSONL."""

    method: str = opt("lora", "Adapter kind to train.", choices=SFT_METHODS)
    completion_only_loss: bool = opt(True, "Loss on the reply tokens only (--no-completion-only-loss: all tokens).")
    chat_template: bool = opt(True, "Render examples with the base tokenizer's chat template (when it has one).")


@dataclass
class CPTArgs(CommonArgs, LoraArgs, BottleneckArgs):
    """``cpt``: continued pre-training on raw text (.txt or .jsonl {"text"}), packed, loss on all tokens."""

    method: str = opt("lora", "Adapter kind to train.", choices=WEIGHT_METHODS)
    packing_strategy: str = opt("wrapped", "How documents are packed into --max-length blocks (bfd_split keeps boundaries).",
                                choices=["wrapped", "bfd_split"])
    eval_data: str | None = opt(None, "Held-out text (.txt or .jsonl): its loss is reported before and after training.")


@dataclass
class RewardArgs(CommonArgs, LoraArgs):
    """``reward``: a LoRA reward model (sequence classification with a score head) on preference pairs."""

    eval_fraction: float = opt(0.1, "Held-out fraction of pairs for pairwise accuracy.")
    center_rewards: float | None = opt(None, "Coefficient pushing rewards towards zero mean (TRL center_rewards_coefficient).")


@dataclass
class DPOArgs(CommonArgs, LoraArgs, BottleneckArgs):
    """``dpo``: direct preference optimisation of a LoRA policy (reference = the base model)."""

    method: str = opt("lora", "Adapter kind to train.", choices=WEIGHT_METHODS)

    beta: float = opt(0.1, "DPO beta (strength of the KL anchor to the base model).")
    loss_type: str = opt("sigmoid", "DPO loss variant.", choices=["sigmoid", "hinge", "ipo", "robust"])
    eval_fraction: float = opt(0.0, "Held-out fraction of pairs evaluated at the end (0 = none).")


@dataclass
class OnlineRLArgs(CommonArgs, LoraArgs, BottleneckArgs):
    """``grpo`` / ``rloo``: online RL of a LoRA policy, rewarded by a trained reward model."""

    method: str = opt("lora", "Adapter kind to train.", choices=WEIGHT_METHODS)

    reward_model: str | None = opt(None, "Reward-model folder written by `python -m training reward`. Required.")
    num_generations: int = opt(4, "Completions sampled per prompt (the group).")
    max_completion_length: int = opt(32, "Longest sampled completion in tokens.")
    temperature: float = opt(1.0, "Sampling temperature for the completions.")
    beta: float = opt(0.0, "KL coefficient to the base model (0 = no reference pass).")


def default_lr(command: str, method: str) -> float:
    """The learning rate used when ``--lr`` is not given."""
    if method in ("ia3", "ln_tuning"):  # a few thousand scale parameters: the same rate for every command
        return DEFAULT_LR[method]
    if command in ("grpo", "rloo"):
        return 1e-4
    if command in ("dpo", "reward"):
        return 1e-4
    return DEFAULT_LR[method]

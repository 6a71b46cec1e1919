"""PEFT configurations for each adapter kind the server serves.

What each kind saves (``adapter_model.safetensors``), as the server reads it:

- ``lora``: ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r].
- ``prompt`` (PROMPT_TUNING): ``prompt_embeddings`` [n, hidden].
- ``ptuning`` (P_TUNING): ``prompt_embeddings`` [n, hidden] = the prompt encoder's *output*
  (PEFT runs the MLP/LSTM once at save time; the encoder weights are not saved).
- ``prefix`` (PREFIX_TUNING): ``prompt_embeddings`` [n, layers*2*kv_heads*head_dim] = the
  per-layer keys and values (after the projection MLP when ``--projection`` is on).
- ``dora`` (LORA with ``use_dora``): LoRA's tensors plus ``.lora_magnitude_vector`` [out] per module.
- ``ia3`` (IA3): ``.ia3_l`` per module, PEFT's defaults for the architecture (Llama: k_proj and v_proj
  outputs, down_proj input).
- ``ln_tuning`` (LN_TUNING): trained copies of the RMSNorm weights, ``.ln_tuning_layers.weight``
  (PEFT's defaults for the architecture; Llama: every layer's two norms and the final norm).
- ``bottleneck`` (not PEFT: :mod:`training.bottleneck` injects the layers itself): AdapterHub's format,
  ``adapter_config.json`` + ``adapter.safetensors``.

:func:`trainer_model` is what every command hands its TRL trainer: the base model's path plus a PEFT config,
or, for ``bottleneck``, the loaded model with the bottlenecks injected and no PEFT config.
"""

from __future__ import annotations

from typing import Any

from training.cli import UsageError
from training.config import METHOD_OPTIONS, WEIGHT_METHODS, LoraArgs, PromptLearningArgs


def lora_config(args: LoraArgs, task_type: str = "CAUSAL_LM") -> Any:
    """A ``peft.LoraConfig`` for a causal-LM policy (or ``SEQ_CLS`` for a reward model)."""
    from peft import LoraConfig

    if args.rank < 1:
        raise UsageError(f"--rank must be >= 1, got {args.rank}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    return LoraConfig(
        task_type=task_type, r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=list(args.target_modules), use_rslora=args.use_rslora, bias="none",
    )


def weight_method_config(method: str, args: LoraArgs) -> Any:
    """The PEFT config of a method that adapts the weights (lora, dora, ia3, ln_tuning) for a causal LM."""
    from peft import IA3Config, LNTuningConfig

    if method == "lora":
        return lora_config(args)
    if method == "dora":
        config = lora_config(args)
        config.use_dora = True
        return config
    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    if method == "ln_tuning":
        return LNTuningConfig(task_type="CAUSAL_LM")
    raise UsageError(f"unknown method {method!r}")


def prompt_learning_config(method: str, args: PromptLearningArgs, tokenizer_path: str) -> Any:
    """A PEFT prompt-learning config (prompt tuning, P-tuning or prefix tuning) for a causal LM."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if args.num_virtual_tokens < 1:
        raise UsageError(f"--num-virtual-tokens must be >= 1, got {args.num_virtual_tokens}")
    if args.encoder_hidden_size < 1:
        raise UsageError(f"--encoder-hidden-size must be >= 1, got {args.encoder_hidden_size}")
    n = args.num_virtual_tokens
    if method == "prompt":
        if args.init_text:
            return PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                prompt_tuning_init_text=args.init_text, tokenizer_name_or_path=tokenizer_path,
            )
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    if method == "ptuning":
        return PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_reparameterization_type=args.encoder,
            encoder_hidden_size=args.encoder_hidden_size,
        )
    if method == "prefix":
        return PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=args.projection,
            encoder_hidden_size=args.encoder_hidden_size,
        )
    raise UsageError(f"unknown prompt-learning method {method!r}")


def check_method_options(method: str, explicit: dict[str, Any], cfg: Any = None) -> None:
    """Refuse options that belong to another method (e.g. ``--init-text`` with ``--method lora``) and, with
    `cfg`, bad bottleneck options (before any output is written)."""
    if method == "bottleneck" and cfg is not None:
        from training.bottleneck import hub_config

        hub_config(cfg.placement, cfg.reduction_factor)
    own = set(METHOD_OPTIONS[method])
    for names in METHOD_OPTIONS.values():
        for name in names:
            if name in explicit and name not in own:
                flag = "--" + name.replace("_", "-")
                users = [m for m, opts in METHOD_OPTIONS.items() if name in opts]
                raise UsageError(f"{flag} applies to --method {'|'.join(users)}, not {method}")


def peft_config_for(method: str, args: Any, tokenizer_path: str) -> Any:
    """The PEFT config for a ``--method`` that PEFT trains (every one but ``bottleneck``)."""
    if method in WEIGHT_METHODS:
        return weight_method_config(method, args)
    return prompt_learning_config(method, args, tokenizer_path)


def trainer_model(run: Any, train_args: dict[str, Any]) -> tuple[Any, Any]:
    """``(model, peft_config)`` for a TRL trainer: ``(run.model_path, PEFT config)``, or for ``--method
    bottleneck`` the base loaded in the run's dtype with its bottlenecks injected and ``None`` (then the
    trainer gets no ``model_init_kwargs``: `train_args` is changed in place)."""
    cfg = run.cfg
    if cfg.method != "bottleneck":
        return run.model_path, peft_config_for(cfg.method, cfg, run.model_path)
    from training import bottleneck

    dtype = train_args["model_init_kwargs"]["dtype"]
    train_args["model_init_kwargs"] = None
    model = bottleneck.build_model(run.model_path, cfg.placement, cfg.reduction_factor,
                                   bottleneck.adapter_name(run.output), dtype, cfg.seed, cfg.gradient_checkpointing)
    return model, None

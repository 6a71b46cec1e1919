"""The correctness oracle: PEFT's own forward pass, and PEFT adapters with weights that visibly matter.

``peft_greedy_reference`` decodes greedily with repeated full forward calls (no KV cache, no ``generate``),
so it exercises exactly PEFT's ``PeftModel.forward`` for every adapter kind. ``make_peft_adapter`` builds a
real PEFT adapter on a base folder, replaces PEFT's (often no-op) initialisation with random weights large
enough to change the tiny models' greedy output, and saves it with ``save_pretrained`` (safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("lora", "prompt", "ptuning", "prefix", "dora", "ia3", "ln")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_reference_model(base_dir: str | Path, adapter_dir: str | Path | None = None) -> torch.nn.Module:
    """transformers model from `base_dir` (float32, eval), wrapped by PEFT when `adapter_dir` is given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


@torch.no_grad()
def peft_greedy_reference(
    base_dir: str | Path,
    adapter_dir: str | Path | None,
    prompt_ids: list[int],
    max_new_tokens: int,
    top_logprobs: int = 0,
):
    """Greedy tokens and their float32 log-probabilities from PEFT (or plain transformers if no adapter).

    Every step runs a full forward over prompt + generated tokens and takes the last position's logits.
    EOS does not stop decoding. Returns ``(tokens, logprobs)``; with ``top_logprobs`` > 0 it returns
    ``(tokens, logprobs, tops)`` where ``tops[i]`` lists the ``top_logprobs`` best ``(token_id, logprob)``
    of step i, best first.
    """
    model = load_reference_model(base_dir, adapter_dir)
    ids = list(prompt_ids)
    tokens: list[int] = []
    logprobs: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # [vocab]
        lp = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
        tok = int(torch.argmax(lp))
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        if top_logprobs > 0:
            vals, idx = torch.topk(lp, top_logprobs)
            tops.append([(int(i), float(v)) for i, v in zip(idx, vals, strict=True)])
        ids.append(tok)
    if top_logprobs > 0:
        return tokens, logprobs, tops
    return tokens, logprobs


@torch.no_grad()
def peft_teacher_forced(base_dir: str | Path, adapter_dir: str | Path | None, seq: list[int], n_prompt: int,
                        dtype: torch.dtype = torch.float64, attn: str = "eager") -> torch.Tensor:
    """Log-probabilities [len(seq) - n_prompt, V] (float64) PEFT gives at each position after the prompt.

    One forward over the whole sequence in `dtype` with `attn` attention: float64 + eager is the ground
    truth the precision tests measure against; float32 runs show the reference's own rounding noise.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, attn_implementation=attn)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    n_new = len(seq) - n_prompt
    # Counted from the end: prompt tuning's logits also cover its virtual tokens, in front.
    logits = model.eval()(input_ids=torch.tensor([seq])).logits[0, -(n_new + 1):-1]  # [n_new, V]
    return torch.log_softmax(logits.double(), dim=-1)


def scale_prefix_adapter(folder: str | Path, factor: float) -> Path:
    """Multiply a saved prefix/prompt adapter's ``prompt_embeddings`` by `factor` in place (large activations)."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v * factor for k, v in tensors.items()}, str(path))
    return Path(folder)


def peft_config(kind: str, **overrides):
    """A PEFT config for `kind` (one of KINDS) with small defaults (IA3 and LN tuning: PEFT's own defaults)."""
    from peft import (
        IA3Config,
        LNTuningConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
    )

    if kind in ("lora", "dora"):
        args = dict(r=4, lora_alpha=8, target_modules=list(ALL_PROJECTIONS), use_dora=kind == "dora")
        return LoraConfig(task_type="CAUSAL_LM", **{**args, **overrides})
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM", **overrides)
    if kind == "ln":
        return LNTuningConfig(task_type="CAUSAL_LM", **overrides)
    if kind == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", **{"num_virtual_tokens": 4, **overrides})
    if kind == "ptuning":
        args = dict(num_virtual_tokens=4, encoder_hidden_size=32)
        return PromptEncoderConfig(task_type="CAUSAL_LM", **{**args, **overrides})
    if kind == "prefix":
        args = dict(num_virtual_tokens=4, encoder_hidden_size=32)
        return PrefixTuningConfig(task_type="CAUSAL_LM", **{**args, **overrides})
    raise ValueError(f"unknown adapter kind {kind!r}; one of {', '.join(KINDS)}")


@torch.no_grad()
def randomize_adapter(peft_model, kind: str, seed: int = 0) -> None:
    """Overwrite the trainable adapter weights with seeded random values that change the output.

    LoRA: A, B ~ N(0, 0.15) (PEFT zero-inits B); DoRA's magnitude times (1 + N(0, 0.3)). IA3 vectors 1 + N(0, 1),
    LN-tuning norm weights 1 + N(0, 0.5). Prompt / P-tuning embeddings ~ N(0, 1). Prefix K/V
    ~ 4 * N(0, 1): raw keys and values must outweigh the real tokens' to move the tiny model's argmax.
    """
    gen = torch.Generator().manual_seed(seed)
    projected = bool(getattr(peft_model.peft_config["default"], "prefix_projection", False))
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if kind == "dora" and "lora_magnitude_vector" in name:
            p.mul_(1 + torch.randn(p.shape, generator=gen) * 0.3)
            continue
        if kind in ("ia3", "ln"):
            p.copy_(1 + torch.randn(p.shape, generator=gen) * (1.0 if kind == "ia3" else 0.5))
            continue
        if kind in ("lora", "dora"):
            std = 0.15
        elif kind == "prefix":
            std = 0.5 if projected else 4.0  # with prefix_projection an MLP makes the K/V from these
        else:
            std = 1.0 if name.endswith("embedding.weight") else 0.3
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_peft_adapter(base_dir: str | Path, out_dir: str | Path, kind: str, seed: int = 0, **config_overrides) -> Path:
    """Build a `kind` adapter on `base_dir` with non-zero random weights; ``save_pretrained`` it to `out_dir`.

    `config_overrides` go to the PEFT config (e.g. ``r=8, use_rslora=True`` or ``prefix_projection=True``).
    """
    from peft import get_peft_model

    torch.manual_seed(seed)
    base = load_reference_model(base_dir)
    peft_model = get_peft_model(base, peft_config(kind, **config_overrides))
    randomize_adapter(peft_model, kind, seed)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


@torch.no_grad()
def peft_mix_reference(base_dir: str | Path, parts: list[tuple[str | Path, float]], prompt_ids: list[int],
                       max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and logprobs of PEFT's ``add_weighted_adapter(..., combination_type="cat")`` over
    LoRA adapter folders with weights (one adapter: PEFT switches to "linear", which needs weight > 0)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_reference_model(base_dir), str(parts[0][0]), adapter_name="a0")
    for i, (folder, _) in enumerate(parts[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(parts))], [w for _, w in parts], "mix",
                               combination_type="cat")
    model.set_adapter("mix")
    model.eval()
    ids, tokens, logprobs = list(prompt_ids), [], []
    for _ in range(max_new_tokens):
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        tok = int(torch.argmax(lp))
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        ids.append(tok)
    return tokens, logprobs

"""``make demo``: train an SFT LoRA on the default model on this CPU, serve it, compare replies.

    python -m training.demo [--method lora|dora|ia3|ln_tuning|bottleneck] [--steps 30] [--output runs/demo] [--skip-train]
                            [--backend server|peft]

The adapter learns the fixed reply format of training/data/sft.jsonl (``ANSWER: <answer>``).
The demo then starts an adapterserve server in-process on the same base model, registers the
adapter over gRPC, asks held-out questions (training/data/eval_prompts.jsonl) with and without
the adapter, and prints both replies side by side, plus how many replies follow the format.
``--backend peft`` answers with transformers + PEFT instead of the server (a reference; PEFT has no
bottleneck adapters, so not for ``--method bottleneck``).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
FORMAT_PREFIX = "ANSWER:"
# Learning rate per --method when --lr is not given (IA3 and LN tuning train a few thousand scales).
DEMO_LR = {"lora": 1e-3, "dora": 1e-3, "ia3": 3e-2, "ln_tuning": 3e-3, "bottleneck": 1e-3}


def replies(model_dir: str | Path, adapter_dir: str | Path, prompts: Sequence[str],
            max_new_tokens: int = 24, backend: str = "server", threads: int = 0) -> list[tuple[str, str]]:
    """Greedy (base reply, adapter reply) per prompt, each prompt a user message in the chat template."""
    if backend == "server":
        return served_replies(model_dir, adapter_dir, prompts, max_new_tokens, threads)
    return peft_replies(model_dir, adapter_dir, prompts, max_new_tokens)


def served_replies(model_dir: str | Path, adapter_dir: str | Path, prompts: Sequence[str],
                   max_new_tokens: int = 24, threads: int = 0) -> list[tuple[str, str]]:
    """Replies from an adapterserve server started in-process (``threads`` 0 = all cores); the adapter
    is uploaded over gRPC."""
    import grpc

    from adapterserve.v1 import adapterserve_pb2 as pb
    from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
    from server.app import ServerApp
    from server.config import ServerConfig
    from training.register import register_adapter

    cfg = ServerConfig(model=str(model_dir), port=0, metrics_port=0, http_port=0, threads=threads)
    cfg.validate()
    app = ServerApp(cfg).start()
    try:
        register_adapter(app.target, "demo", adapter_dir, replace=True)
        with grpc.insecure_channel(app.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            def ask(prompt: str, adapter_id: str) -> str:
                request = pb.GenerateRequest(
                    adapter_id=adapter_id,
                    messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
                    params=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                )
                return stub.Generate(request, timeout=300).text.strip()

            return [(ask(p, ""), ask(p, "demo")) for p in prompts]
    finally:
        app.stop(grace=1)


def peft_replies(model_dir: str | Path, adapter_dir: str | Path, prompts: Sequence[str],
                 max_new_tokens: int = 24) -> list[tuple[str, str]]:
    """Replies from transformers + PEFT: the adapter loaded once, disabled for the base replies."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate() -> list[str]:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    with model.disable_adapter():
        base_replies = generate()
    adapter_replies = generate()
    return list(zip(base_replies, adapter_replies, strict=True))


def follows_format(reply: str) -> bool:
    """True when the reply has the trained format."""
    return reply.strip().startswith(FORMAT_PREFIX)


def print_side_by_side(prompts: Sequence[str], pairs: Sequence[tuple[str, str]], width: int = 44) -> None:
    """A three-column table: prompt | base reply | adapter reply."""
    def cell(text: str) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width) or [""]

    header = f"{'prompt':<{width}} | {'base model':<{width}} | {'with the SFT LoRA adapter':<{width}}"
    print(header)
    print("-" * len(header))
    for prompt, (base, tuned) in zip(prompts, pairs, strict=True):
        cols = [cell(prompt), cell(base), cell(tuned)]
        for i in range(max(map(len, cols))):
            print(" | ".join(f"{(c[i] if i < len(c) else ''):<{width}}" for c in cols))
        print("-" * len(header))


def main(argv: Sequence[str] | None = None) -> int:
    """Train (unless --skip-train), then print base vs adapter replies."""
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/demo", help="adapter folder (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps (default: 30, ~1.5 min on 2 idle cores)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    parser.add_argument("--method", choices=list(DEMO_LR), default="lora", help="adapter kind to train (default: lora)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: per method, " + ", ".join(f"{k} {v:g}" for k, v in DEMO_LR.items())
                        + ")")
    parser.add_argument("--prompts", type=int, default=8, help="held-out questions to ask (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="reply length (default: 24)")
    parser.add_argument("--skip-train", action="store_true", help="reuse the adapter already in --output")
    parser.add_argument("--backend", choices=["server", "peft"], default="server",
                        help="who answers: an in-process adapterserve server (default) or transformers + PEFT")
    args = parser.parse_args(argv)
    if args.method == "bottleneck" and args.backend == "peft":
        parser.error("--backend peft: PEFT has no bottleneck adapters (use --backend server)")

    from server.model.default_model import ensure_default_model
    from training.register import adapter_files

    model_dir = ensure_default_model()
    adapter_dir = Path(args.output)
    if not args.skip_train:
        from training.__main__ import main as train_main

        started = time.perf_counter()
        code = train_main([
            "sft", "--method", args.method, "--model", str(model_dir), "--data", str(DATA / "sft.jsonl"),
            "--output", str(adapter_dir), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr if args.lr is not None else DEMO_LR[args.method]), "--logging-steps", "2", "--save-steps", str(args.steps), "--seed", "0",
        ])
        if code:
            return code
        print(f"\ntrained {args.steps} steps in {time.perf_counter() - started:.0f} s -> {adapter_dir}\n")
    elif not (adapter_dir / adapter_files(adapter_dir)[1]).is_file():
        print(f"error: --skip-train but no adapter in {adapter_dir}", file=sys.stderr)
        return 2

    rows = [json.loads(line) for line in (DATA / "eval_prompts.jsonl").read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows[: args.prompts]]
    pairs = replies(model_dir, adapter_dir, prompts, args.max_new_tokens, args.backend)
    print(f"replies from {'adapterserve (in-process server)' if args.backend == 'server' else 'transformers + PEFT'}:")
    print_side_by_side(prompts, pairs)
    base_ok = sum(follows_format(b) for b, _ in pairs)
    tuned_ok = sum(follows_format(t) for _, t in pairs)
    print(f"replies in the trained '{FORMAT_PREFIX} ...' format: base {base_ok}/{len(pairs)}, "
          f"adapter {tuned_ok}/{len(pairs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

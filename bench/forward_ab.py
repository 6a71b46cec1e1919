"""A/B of the CPU forward at two git revisions of server/model/llama.py, in one process, interleaved.

    python -m bench.forward_ab --base f6b9006 --head bcd44ee     # the shared-forward refactor (issue 16)
    python -m bench.forward_ab --base REV                         # REV vs the working tree

Both runtimes share the default model's weights (or --model's) and one KV cache; each round times
`--calls` forwards of each revision in turn, and the table gives medians over `--rounds` rounds,
head/base ratios and the largest logit difference. Only llama.py is swapped: the modules it imports
come from the working tree. Run it on a quiet host: the ratios are what to quote.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from server.model.llama import PagedKVCache, StepInput
from server.model.loader import load_model

STEPS = {"decode, 8 rows": (8, 1, 60), "decode, 1 row": (1, 1, 60), "prefill, 2 x 48 tokens": (2, 48, 0)}


def llama_at(rev: str | None, tag: str):
    """The llama module of revision `rev` (None: the working tree's)."""
    if rev is None:
        import server.model.llama as mod

        return mod
    text = subprocess.run(["git", "show", f"{rev}:server/model/llama.py"], capture_output=True, text=True,
                          check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"llama_{tag}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"llama_{tag}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--head", default=None, help="revision (default: the working tree)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args(argv)
    loaded = load_model(args.model).runtime
    runtimes = {}
    for label, rev in (("base", args.base), ("head", args.head)):
        mod = llama_at(rev, label)
        runtimes[label] = mod.LlamaRuntime(loaded.args, loaded.w, "cpu", torch.float32, kernels="torch")
    cache = PagedKVCache(loaded.args, 64, 16, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    print("| step | base ms | head ms | head/base | max |logit diff| |\n|---|---|---|---|---|")
    for name, (bsz, seq, start) in STEPS.items():
        step = StepInput(start=torch.full((bsz,), start), lengths=torch.full((bsz,), seq),
                         block_tables=torch.arange(bsz * 8).view(bsz, 8) % 64,
                         input_ids=torch.randint(0, loaded.args.vocab_size, (bsz, seq), generator=gen))
        diff = (runtimes["base"].forward(step, cache) - runtimes["head"].forward(step, cache)).abs().max()
        times: dict[str, list[float]] = {"base": [], "head": []}
        for _ in range(args.rounds):
            for label, rt in runtimes.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    rt.forward(step, cache)
                times[label].append((time.perf_counter() - t0) / args.calls)
        base, head = statistics.median(times["base"]), statistics.median(times["head"])
        print(f"| {name} | {base * 1e3:.2f} | {head * 1e3:.2f} | {head / base:.3f} | {diff:.2g} |", flush=True)


if __name__ == "__main__":
    main()

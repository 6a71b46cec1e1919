"""``python -m training <command>`` (console script ``adapterserve-train``).

Commands: sft, cpt, reward, dpo, grpo, rloo. Every command takes ``--help`` and ``--config FILE.yaml``.
Exit codes: 0 success, 1 failure (e.g. registration refused), 2 bad options or bad data.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from training.cli import UsageError, add_dataclass_arguments, build_config
from training.config import CPTArgs, DPOArgs, OnlineRLArgs, RewardArgs, SFTArgs
from training.data import DataError

# command -> (options dataclass, "module:function", one-line help)
COMMANDS = {
    "sft": (SFTArgs, "training.sft:run",
            "Supervised fine-tuning: LoRA, prompt tuning, P-tuning or prefix tuning on chat/prompt-completion JSONL."),
    "cpt": (CPTArgs, "training.cpt:run", "Continued pre-training of a LoRA on raw text (.txt or .jsonl), packed."),
    "reward": (RewardArgs, "training.reward:run",
               "Reward model (LoRA + score head) on preference pairs; reports held-out pairwise accuracy."),
    "dpo": (DPOArgs, "training.dpo:run", "Offline RLHF: DPO of a LoRA policy on preference pairs."),
    "grpo": (OnlineRLArgs, "training.online_rl:run",
             "Online RLHF: GRPO of a LoRA policy, rewarded by a trained reward model."),
    "rloo": (OnlineRLArgs, "training.online_rl:run_rloo",
             "Online RLHF: RLOO of a LoRA policy, rewarded by a trained reward model."),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train adapters that adapterserve serves: SFT, continued pre-training, reward models, DPO, "
                    "GRPO/RLOO. Runs the same under `accelerate launch` (see training/README.md).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_dataclass_arguments(p, cls)
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[str, object]:
    """(command, typed config) from the command line (+ ``--config`` YAML)."""
    namespace = build_parser().parse_args(argv)
    cls = COMMANDS[namespace.command][0]
    return namespace.command, build_config(cls, namespace, namespace.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    try:
        command, cfg = parse(argv)
        module, func = COMMANDS[command][1].split(":")
        return int(getattr(importlib.import_module(module), func)(cfg) or 0)
    except (UsageError, DataError) as e:
        kind = "invalid data" if isinstance(e, DataError) else "error"
        print(f"{kind}:\n{e}" if isinstance(e, DataError) else f"{kind}: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

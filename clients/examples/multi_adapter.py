"""Send one prompt to several adapters at once; the server batches them together.

    python -m clients.examples.multi_adapter --adapters support,poet,sql "Summarise: the cat sat"

Uses the asyncio client so all requests are in flight concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from clients import AsyncAdapterServeClient


async def run(target: str, token: str | None, prompt: str, adapters: list[str], max_new_tokens: int) -> None:
    """Generate ``prompt`` with every adapter (and the base model) concurrently and print each answer."""
    async with AsyncAdapterServeClient(target, token=token) as client:
        names = [None, *adapters]  # None = the base model
        results = await asyncio.gather(
            *(client.generate(prompt, adapter=a, max_new_tokens=max_new_tokens) for a in names),
            return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            label = name or "(base)"
            if isinstance(result, Exception):
                print(f"--- {label}: {result}")
            else:
                print(f"--- {label} [{result.finish_reason}, {result.completion_tokens} tokens, "
                      f"{result.timings.total_ms:.0f} ms]\n{result.text}")


def main() -> None:
    """Parse arguments and run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--adapters", default="", help="comma-separated adapter ids")
    p.add_argument("--target", default=os.environ.get("ADAPTERSERVE_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token", default=os.environ.get("ADAPTERSERVE_TOKEN"))
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    a = p.parse_args()
    asyncio.run(run(a.target, a.token, a.prompt, [x for x in a.adapters.split(",") if x], a.max_new_tokens))


if __name__ == "__main__":
    main()

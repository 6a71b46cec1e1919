"""Stream a chat reply token by token, then print usage and timings.

    python -m clients.examples.streaming "Write a limerick about GPUs" --adapter poet
"""

from __future__ import annotations

import argparse
import os

from clients import AdapterServeClient, collect


def main() -> None:
    """Stream one reply to stdout."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--adapter")
    p.add_argument("--target", default=os.environ.get("ADAPTERSERVE_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token", default=os.environ.get("ADAPTERSERVE_TOKEN"))
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    a = p.parse_args()

    with AdapterServeClient(a.target, token=a.token) as client:
        chunks = []
        messages = [{"role": "user", "content": a.prompt}]
        for chunk in client.stream(messages=messages, adapter=a.adapter, max_new_tokens=a.max_new_tokens,
                                   temperature=0.7, seed=1):
            print(chunk.text, end="", flush=True)  # breaking out of this loop cancels the request
            chunks.append(chunk)
        result = collect(chunks)
        print(f"\n\n[{result.finish_reason}] {result.prompt_tokens} prompt + {result.completion_tokens} "
              f"generated tokens; first token after {result.timings.time_to_first_token_ms:.0f} ms, "
              f"total {result.timings.total_ms:.0f} ms")


if __name__ == "__main__":
    main()

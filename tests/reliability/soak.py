"""The mixed load for N minutes, outside CI: ``python -m tests.reliability.soak --minutes N``.

Builds the tiny random llama and one PEFT adapter of each kind in a temporary folder (nothing is
downloaded), starts a real server in-process, registers the adapters and runs the seeded mixed
load of tests/reliability/load.py (greedy / streamed / sampled requests, cancels, short deadlines)
in one-minute rounds, printing the tallies and RSS after each. Exits 1 if any request was lost,
ended twice, answered a status other than OK / CANCELLED / DEADLINE_EXCEEDED, or (greedy) differed
from PEFT's reference, or if the engine does not return to idle.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.reliability.load import KINDS, PROMPTS, MixedLoad, greedy_references, make_adapters, rss_bytes
from tests.serving import start_server_fixture
from tests.tiny_models import make_tiny_model

N_NEW = 6
OK_STATUSES = {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_model(Path(tmp) / "model", "llama", 0)
        root = make_adapters(base, Path(tmp) / "adapters")
        refs = greedy_references(base, root, N_NEW)
        gen = start_server_fixture()
        srv = next(gen)(base, adapter_root=str(root), kv_cache_tokens=2048, max_batch_size=8)
        try:
            for kind in KINDS:
                srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=kind, path=kind), timeout=60)
            return _soak(srv, refs, args)
        finally:
            next(gen, None)


def _soak(srv, refs, args) -> int:
    load = MixedLoad(srv, PROMPTS, refs, [None, *KINDS], N_NEW, seed=args.seed, concurrency=args.concurrency)
    rss0 = rss_bytes()
    failed = False
    end = time.monotonic() + args.minutes * 60
    round_no = 0
    while time.monotonic() < end:
        round_no += 1
        tally = load.run(seconds=min(60.0, max(1.0, end - time.monotonic())))
        bad = tally.lost or tally.double_terminal or tally.mismatches or set(tally.statuses) - OK_STATUSES
        failed |= bool(bad)
        print(f"round {round_no}: {tally.summary()}; RSS {(rss_bytes() - rss0) / 2**20:+.1f} MiB", flush=True)
        for m in tally.mismatches[:3]:
            print("  mismatch:", m, flush=True)
    deadline = time.monotonic() + 30
    while srv.app.engine.num_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    alloc = srv.app.engine.allocator
    idle = srv.app.engine.num_active() == 0 and alloc.free_pages == alloc.num_pages
    print(f"idle afterwards: {idle} (free KV pages {alloc.free_pages}/{alloc.num_pages}); "
          f"{'FAILED' if failed or not idle else 'OK'}", flush=True)
    return 1 if failed or not idle else 0


if __name__ == "__main__":
    sys.exit(main())

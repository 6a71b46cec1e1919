"""A seeded mixed load against a running server: every adapter kind and the base model, greedy and
sampled requests, client cancels after the first chunk and short deadlines, unary and streaming.

Each request is one job on a thread pool and must end in exactly one terminal outcome (a final
response or stream chunk with a finish reason, or one gRPC status); a job still running at the end
is *lost*. Greedy requests that finish OK must equal their PEFT reference tokens. Used by the
reliability tests with a small request count and by ``python -m tests.reliability.soak``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.peft_reference import make_peft_adapter, peft_greedy_reference
from tests.serving import make_request

KINDS = ("lora", "prompt", "ptuning", "prefix")
PROMPTS = [[5, 40, 41, 42], [7, 8, 9, 10, 11, 12], [100, 3, 77]]
ACTIONS = ("greedy", "greedy_stream", "sampled", "cancel", "deadline")


def make_adapters(base: Path, root: Path) -> Path:
    """One PEFT adapter of each kind (plus a second LoRA, "lora2") on the base model, under `root`."""
    for i, kind in enumerate(KINDS):
        make_peft_adapter(base, root / kind, kind, seed=20 + i)
    make_peft_adapter(base, root / "lora2", "lora", seed=31, r=4, target_modules=["q_proj", "v_proj"])
    return root


def greedy_references(base: Path, root: Path, n_new: int) -> dict[str | None, list[list[int]]]:
    """{adapter name or None: PEFT's greedy tokens for each of PROMPTS}."""
    refs = {}
    for name in (None, *KINDS, "lora2"):
        folder = None if name is None else root / name
        refs[name] = [peft_greedy_reference(base, folder, p, n_new)[0] for p in PROMPTS]
    return refs


def rss_bytes() -> int:
    """Resident memory of this process (the in-process server included)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Tally:
    """Outcomes of a load run, by status name; mismatches are greedy outputs that differ from the reference."""

    statuses: collections.Counter = field(default_factory=collections.Counter)
    by_action: collections.Counter = field(default_factory=collections.Counter)
    mismatches: list[str] = field(default_factory=list)
    double_terminal: int = 0
    lost: int = 0
    requests: int = 0
    seconds: float = 0.0

    def add(self, action: str, status: str) -> None:
        self.statuses[status] += 1
        self.by_action[(action, status)] += 1

    def summary(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.requests} requests in {self.seconds:.1f} s ({rate:.1f}/s): {parts}; lost {self.lost}, "
                f"double terminal {self.double_terminal}, greedy mismatches {len(self.mismatches)}")


class MixedLoad:
    """`run(n_requests)` or `run(seconds=...)`: jobs drawn from a seeded RNG, `concurrency` at a time."""

    def __init__(self, server, prompts: list[list[int]], refs: dict, adapters: list[str | None], n_new: int,
                 seed: int = 0, concurrency: int = 8, deadline_s: tuple[float, float] = (0.02, 0.3)):
        self.server = server
        self.prompts = prompts
        self.refs = refs
        self.adapters = adapters
        self.n_new = n_new
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.deadline_s = deadline_s
        self._lock = threading.Lock()

    def jobs(self, n: int) -> list[tuple[str | None, int, str, float, int]]:
        """(adapter, prompt index, action, deadline, seed) for n requests."""
        return [(self.rng.choice(self.adapters), self.rng.randrange(len(self.prompts)), self.rng.choice(ACTIONS),
                 self.rng.uniform(*self.deadline_s), self.rng.randrange(2**31)) for _ in range(n)]

    def run(self, n_requests: int | None = None, seconds: float | None = None, timeout_s: float = 120.0) -> Tally:
        tally = Tally()
        t0 = time.monotonic()
        stop_at = None if seconds is None else t0 + seconds
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            pending: set[concurrent.futures.Future] = set()
            submitted = 0
            while True:
                more = (n_requests is None or submitted < n_requests) and (stop_at is None or time.monotonic() < stop_at)
                if more and len(pending) < self.concurrency * 2:
                    pending.add(pool.submit(self._one, tally, *self.jobs(1)[0]))
                    submitted += 1
                    continue
                if not pending:
                    break
                done, pending = concurrent.futures.wait(pending, timeout=timeout_s,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                if not done:  # nothing finished for timeout_s: whatever is left is lost
                    tally.lost += len(pending)
                    for f in pending:
                        f.cancel()
                    break
                for f in done:
                    f.result()  # a bug in the harness itself must surface
        tally.requests = submitted
        tally.seconds = time.monotonic() - t0
        return tally

    # ------------------------------------------------------------------ one request
    def _one(self, tally: Tally, adapter: str | None, prompt: int, action: str, deadline: float, seed: int) -> None:
        kw = dict(token_ids=self.prompts[prompt], adapter_id=adapter or "", max_new_tokens=self.n_new,
                  ignore_eos=True)
        if action == "sampled":
            kw.update(temperature=0.8, top_p=0.9, seed=seed)
        request = make_request(**kw)
        timeout = deadline if action == "deadline" else 60.0
        terminals = 0
        tokens: list[int] = []
        status = "OK"
        try:
            if action in ("greedy", "sampled", "deadline"):
                resp = self.server.gen.Generate(request, timeout=timeout)
                tokens = list(resp.token_ids)
                terminals += 1
            else:
                stream = self.server.gen.GenerateStream(request, timeout=timeout)
                for chunk in stream:
                    tokens.extend(chunk.token_ids)
                    if chunk.finish_reason:
                        terminals += 1
                    elif action == "cancel" and tokens:
                        stream.cancel()
        except grpc.RpcError as e:
            status = e.code().name
            terminals += 1
        with self._lock:
            tally.add(action, status)
            if terminals != 1:
                tally.double_terminal += 1
            ref = self.refs[adapter][prompt]
            if status == "OK" and action in ("greedy", "greedy_stream", "deadline") and tokens != ref:
                tally.mismatches.append(f"{adapter}/{prompt}/{action}: {tokens} != {ref}")

"""``adapterserve``: the command-line client.

    adapterserve generate "Write a haiku" --adapter poet -n 64     # streams to the terminal
    adapterserve generate "Hi" --json                               # the full result as JSON
    adapterserve chat --adapter support --system "Be brief."        # interactive, keeps history
    adapterserve adapters list | show ID | register ID --local-dir DIR | unregister ID
    adapterserve health | info | metrics

Connection options (before or after the command): ``--target`` (env ADAPTERSERVE_TARGET,
default 127.0.0.1:50051), ``--token`` / ``--token-file`` (env ADAPTERSERVE_TOKEN),
``--tls-ca`` (env ADAPTERSERVE_TLS_CA), ``--tls-cert``/``--tls-key`` for mutual TLS
(env ADAPTERSERVE_CLIENT_CERT / ADAPTERSERVE_CLIENT_KEY), ``--timeout``, and against a cluster
``--engine-app`` (env ADAPTERSERVE_ENGINE_APP: generate and chat go straight to the engine
replica holding the adapter, one hop fewer) and ``--lookaside`` (env ADAPTERSERVE_LOOKASIDE=1:
generate and chat lease the replica and stream from its own server; docs/scale-out.md).
Exit status: 0 success, 1 the call failed (message on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from clients._common import DEFAULT_TARGET, parse_adapter
from clients.client import AdapterServeClient
from clients.errors import AdapterServeError, NotFoundError
from clients.types import AdapterInfo, GenerationResult, StreamChunk, TokenLogprob, collect

DEFAULT_TIMEOUT = 60.0
GENERATE_TIMEOUT = 300.0
METRICS_PORT = 9464


class CliError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 1."""


# ---------------------------------------------------------------------------- output helpers


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
        return True
    except ValueError:
        return cell in ("-", "")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with two spaces between them; numeric columns right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in cells[1:]) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    """``key: value`` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in pairs)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_json(obj: Any) -> None:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    elif isinstance(obj, list):
        obj = [dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o for o in obj]
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# ---------------------------------------------------------------------------- connection


def _make_client(args: argparse.Namespace, default_timeout: float = DEFAULT_TIMEOUT) -> AdapterServeClient:
    env = os.environ
    token = getattr(args, "token", None)
    token_file = getattr(args, "token_file", None)
    if token is None and token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CliError(f"--token-file: {e}") from e
    if token is None:
        token = env.get("ADAPTERSERVE_TOKEN") or None
    timeout = getattr(args, "timeout", None)
    timeout = default_timeout if timeout is None else (None if timeout <= 0 else timeout)
    try:
        return AdapterServeClient(
            _target(args), token=token,
            tls_ca=getattr(args, "tls_ca", None) or env.get("ADAPTERSERVE_TLS_CA") or None,
            tls_cert=getattr(args, "tls_cert", None) or env.get("ADAPTERSERVE_CLIENT_CERT") or None,
            tls_key=getattr(args, "tls_key", None) or env.get("ADAPTERSERVE_CLIENT_KEY") or None,
            timeout=timeout,
            engine_app=getattr(args, "engine_app", None) or env.get("ADAPTERSERVE_ENGINE_APP") or None,
            lookaside=bool(getattr(args, "lookaside", False)) or env.get("ADAPTERSERVE_LOOKASIDE") == "1",
        )
    except (OSError, ValueError) as e:
        raise CliError(str(e)) from e


def _target(args: argparse.Namespace) -> str:
    return getattr(args, "target", None) or os.environ.get("ADAPTERSERVE_TARGET") or DEFAULT_TARGET


# ---------------------------------------------------------------------------- generate / chat


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "adapter": parse_adapter(args.adapter), "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty, "seed": args.seed,
        "stop": args.stop or None, "ignore_eos": args.ignore_eos,
    }


def _stream_to(out: Any, chunks: Any) -> list[StreamChunk]:
    """Write each chunk's text as it arrives; returns the chunks."""
    seen: list[StreamChunk] = []
    for chunk in chunks:
        seen.append(chunk)
        if chunk.text:
            out.write(chunk.text)
            out.flush()
    return seen


def _logprob_table(logprobs: list[TokenLogprob]) -> str:
    rows = [(repr(lp.token), lp.token_id, f"{lp.logprob:.4f}",
             "  ".join(f"{t.token!r}:{t.logprob:.2f}" for t in lp.top)) for lp in logprobs]
    return format_table(["TOKEN", "ID", "LOGPROB", "TOP"], rows)


def _stats_line(r: GenerationResult) -> str:
    t = r.timings
    return (f"[finish={r.finish_reason} prompt_tokens={r.prompt_tokens} completion_tokens="
            f"{r.completion_tokens} queue={t.queue_ms:.0f}ms ttft={t.time_to_first_token_ms:.0f}ms "
            f"total={t.total_ms:.0f}ms request_id={r.request_id}]")


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout (or print the whole result as JSON)."""
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise CliError("give a prompt (or '-' to read it from stdin)")
        prompt = sys.stdin.read()
    source: dict[str, Any] = {"prompt": prompt}
    if args.system is not None or args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        source = {"messages": msgs + [{"role": "user", "content": prompt}]}
    kw = {**source, **_sampling(args), "logprobs": args.logprobs or args.top_logprobs > 0,
          "top_logprobs": args.top_logprobs, "request_id": args.request_id}
    with _make_client(args, GENERATE_TIMEOUT) as client:
        if args.json:
            _print_json(client.generate(**kw))
            return 0
        result = collect(_stream_to(sys.stdout, client.stream(**kw)))
    if not result.text.endswith("\n"):
        print()
    if result.logprobs:
        print(_logprob_table(result.logprobs))
    if args.stats:
        print(_stats_line(result), file=sys.stderr)
    return 0


CHAT_HELP = """commands:
  /adapter ID   switch adapter (history is kept)     /adapter -   back to the base model
  /adapter      show the current adapter             /system TEXT set the system prompt
  /reset        forget the conversation              /history     print the conversation
  /exit         quit (also /quit or end of input)    /help        this text"""


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: each turn sends the whole history as chat messages."""
    interactive = sys.stdin.isatty()
    system = args.system
    history: list[dict[str, str]] = []
    adapter = args.adapter or None
    sampling = _sampling(args)
    with _make_client(args, GENERATE_TIMEOUT) as client:
        if interactive:
            print(f"chatting with {client.target} ({adapter or 'base model'}); /help for commands",
                  file=sys.stderr)
        while True:
            try:
                line = input(f"{adapter or 'base'}> " if interactive else "")
            except EOFError:
                if interactive:
                    print()
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, rest = line.partition(" ")
                rest = rest.strip()
                if cmd in ("/exit", "/quit"):
                    return 0
                if cmd == "/help":
                    print(CHAT_HELP)
                elif cmd == "/adapter":
                    if not rest:
                        print(f"adapter: {adapter or '(base model)'}")
                    elif rest == "-":
                        adapter = None
                        print("adapter: (base model)")
                    else:
                        try:
                            client.get_adapter(rest)
                        except NotFoundError as e:
                            print(f"error: {e.message}", file=sys.stderr)
                            continue
                        adapter = rest
                        print(f"adapter: {adapter}")
                elif cmd == "/system":
                    system = rest or None
                    print(f"system prompt: {system or '(none)'}")
                elif cmd == "/reset":
                    history.clear()
                    print("conversation cleared")
                elif cmd == "/history":
                    for m in ([{"role": "system", "content": system}] if system else []) + history:
                        print(f"{m['role']}: {m['content']}")
                else:
                    print(f"unknown command {cmd}; /help lists them", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            try:
                chunks = _stream_to(sys.stdout, client.stream(messages=messages, **{**sampling, "adapter": adapter}))
            except AdapterServeError as e:
                history.pop()
                print(f"\nerror: {e}", file=sys.stderr)
                continue
            except KeyboardInterrupt:
                history.pop()
                print("\n[interrupted]", file=sys.stderr)
                continue
            reply = "".join(c.text for c in chunks)
            print()
            history.append({"role": "assistant", "content": reply})


# ---------------------------------------------------------------------------- adapters


def _adapter_row(a: AdapterInfo) -> list[Any]:
    return [a.adapter_id, a.type, a.rank or "-", a.num_virtual_tokens or "-", a.state,
            _yes(a.pinned), _yes(a.merged), a.active_requests, human_bytes(a.size_bytes),
            f"{a.load_ms:.1f}", a.base_model or "-"]


ADAPTER_HEADERS = ["ID", "TYPE", "RANK", "VTOKENS", "STATE", "PINNED", "MERGED", "ACTIVE",
                   "SIZE", "LOAD_MS", "BASE_MODEL"]


def _adapter_pairs(a: AdapterInfo) -> str:
    return format_pairs([
        ("id", a.adapter_id), ("type", a.type), ("rank", a.rank), ("virtual tokens", a.num_virtual_tokens),
        ("target modules", ", ".join(a.target_modules) or "-"), ("state", a.state),
        ("pinned", _yes(a.pinned)), ("merged", _yes(a.merged)), ("active requests", a.active_requests),
        ("size", f"{human_bytes(a.size_bytes)} ({a.size_bytes} bytes)"), ("load time", f"{a.load_ms:.1f} ms"),
        ("base model", a.base_model or "-"),
    ])


def cmd_adapters(args: argparse.Namespace) -> int:
    """adapters list | show | register | unregister."""
    with _make_client(args) as client:
        if args.adapters_cmd == "list":
            adapters = client.list_adapters()
            if args.json:
                _print_json(adapters)
            elif not adapters:
                print("no adapters registered")
            else:
                print(format_table(ADAPTER_HEADERS, [_adapter_row(a) for a in adapters]))
        elif args.adapters_cmd == "show":
            a = client.get_adapter(args.adapter_id)
            if args.json:
                _print_json(a)
            else:
                print(_adapter_pairs(a))
        elif args.adapters_cmd == "register":
            try:
                a = client.register_adapter(args.adapter_id, path=args.path, local_dir=args.local_dir,
                                            merge=args.merge, pin=args.pin, replace=args.replace)
            except (OSError, ValueError) as e:
                raise CliError(str(e)) from e
            if args.json:
                _print_json(a)
            else:
                print(f"registered {a.adapter_id}")
                print(_adapter_pairs(a))
        elif args.adapters_cmd == "unregister":
            print(f"unregistered {client.unregister_adapter(args.adapter_id)}")
    return 0


# ---------------------------------------------------------------------------- health / info


def cmd_health(args: argparse.Namespace) -> int:
    """Print the health status; exit 0 only when SERVING."""
    with _make_client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_info(args: argparse.Namespace) -> int:
    """Print the served model and the server's limits."""
    with _make_client(args) as client:
        info = client.model_info()
    if args.json:
        _print_json(info)
        return 0
    pairs = [(f.name.replace("_", " "), getattr(info, f.name)) for f in dataclasses.fields(info)
             if f.name not in ("limits", "kernels")]
    pairs += [(f"limit: {f.name.replace('_', ' ')}", getattr(info.limits, f.name))
              for f in dataclasses.fields(info.limits)]
    pairs += [(f"kernels: {f.name.replace('_', ' ')}", getattr(info.kernels, f.name))
              for f in dataclasses.fields(info.kernels)]
    print(format_pairs(pairs))
    return 0


# ---------------------------------------------------------------------------- metrics


@dataclasses.dataclass
class AdapterMetrics:
    """Per-adapter numbers from one /metrics scrape (cumulative since the server started)."""

    adapter: str
    requests: float = 0.0
    errors: float = 0.0
    generation_tokens: float = 0.0
    duration_sum_s: float = 0.0
    duration_count: float = 0.0
    buckets: dict[float, float] = dataclasses.field(default_factory=dict)  # le -> cumulative count

    @property
    def tokens_per_second(self) -> float | None:
        """Generated tokens / summed request durations (per-request speed incl. queue and prefill)."""
        return self.generation_tokens / self.duration_sum_s if self.duration_sum_s > 0 else None

    def latency_quantile(self, q: float) -> float | None:
        """Request duration quantile in seconds, interpolated in the histogram buckets."""
        return histogram_quantile(q, self.buckets)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding rank q·N.

    ``buckets`` maps upper bound ``le`` (``math.inf`` included) to the cumulative count. A rank
    in the +Inf bucket gives the largest finite bound; None when there are no observations.
    """
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]) or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_bound if len(bounds) > 1 else None
            if le <= 0 or count == prev_count:
                return le
            return prev_bound + (le - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = le, count
    return prev_bound


def summarize_metrics(text: str) -> list[AdapterMetrics]:
    """Per-adapter rows from a Prometheus text exposition, busiest first, plus an ``ALL`` row.

    Reads ``adapterserve_requests_total{adapter,status}`` (errors = status other than OK),
    ``adapterserve_generation_tokens_total{adapter}`` and the histogram
    ``adapterserve_request_duration_seconds{adapter}``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[str, AdapterMetrics] = {}

    def row(name: str) -> AdapterMetrics:
        return rows.setdefault(name, AdapterMetrics(name))

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            adapter = s.labels.get("adapter")
            if adapter is None:
                continue
            if s.name == "adapterserve_requests_total":
                row(adapter).requests += s.value
                if s.labels.get("status", "OK").upper() != "OK":
                    row(adapter).errors += s.value
            elif s.name == "adapterserve_generation_tokens_total":
                row(adapter).generation_tokens += s.value
            elif s.name == "adapterserve_request_duration_seconds_sum":
                row(adapter).duration_sum_s += s.value
            elif s.name == "adapterserve_request_duration_seconds_count":
                row(adapter).duration_count += s.value
            elif s.name == "adapterserve_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                row(adapter).buckets[le] = row(adapter).buckets.get(le, 0.0) + s.value
    result = sorted(rows.values(), key=lambda r: (-r.requests, r.adapter))
    if len(result) > 1:
        total = AdapterMetrics("ALL")
        merged: dict[float, float] = defaultdict(float)
        for r in result:
            total.requests += r.requests
            total.errors += r.errors
            total.generation_tokens += r.generation_tokens
            total.duration_sum_s += r.duration_sum_s
            total.duration_count += r.duration_count
            for le, c in r.buckets.items():
                merged[le] += c
        # Only bounds every adapter has are exact after summing; with equal bucket layouts that is all.
        common = set.intersection(*(set(r.buckets) for r in result if r.buckets)) if any(
            r.buckets for r in result) else set()
        total.buckets = {le: merged[le] for le in common}
        result.append(total)
    return result


def _default_metrics_url(target: str) -> str:
    host = target.split("://", 1)[-1].lstrip("/")
    host = host.split("/", 1)[-1] if host.startswith(("dns:", "ipv4:", "ipv6:")) else host
    host = host.split(":", 1)[1] if host.startswith(("dns:", "ipv4:", "ipv6:")) else host
    if host.startswith("["):  # [::1]:50051
        host = host[: host.index("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return f"http://{host or '127.0.0.1'}:{METRICS_PORT}/metrics"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_metrics(args: argparse.Namespace) -> int:
    """Fetch /metrics and print the per-adapter summary table."""
    url = args.metrics_url or os.environ.get("ADAPTERSERVE_METRICS_URL") or _default_metrics_url(_target(args))
    timeout = getattr(args, "timeout", None) or 10.0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"cannot fetch {url}: {getattr(e, 'reason', e)}") from e
    rows = summarize_metrics(text)
    if args.json:
        _print_json([{"adapter": r.adapter, "requests": r.requests, "errors": r.errors,
                      "generation_tokens": r.generation_tokens, "tokens_per_second": r.tokens_per_second,
                      "p50_seconds": r.latency_quantile(0.5), "p99_seconds": r.latency_quantile(0.99)}
                     for r in rows])
        return 0
    if not rows:
        print(f"no adapterserve request metrics at {url} yet")
        return 0
    table = [[r.adapter, f"{r.requests:.0f}", f"{r.errors:.0f}", f"{r.generation_tokens:.0f}",
              _fmt(r.tokens_per_second, ".1f"),
              _fmt(None if r.latency_quantile(0.5) is None else 1000 * r.latency_quantile(0.5), ".0f"),
              _fmt(None if r.latency_quantile(0.99) is None else 1000 * r.latency_quantile(0.99), ".0f")]
             for r in rows]
    print(format_table(["ADAPTER", "REQUESTS", "ERRORS", "GEN_TOKENS", "TOKENS/S", "P50_MS", "P99_MS"], table))
    print("\nsince server start. TOKENS/S = generated tokens / summed request durations (per-request "
          "speed incl. queueing and prefill);\nP50/P99 = request duration, interpolated in histogram buckets.")
    return 0


# ---------------------------------------------------------------------------- parser


def _connection_options() -> argparse.ArgumentParser:
    """Connection flags; accepted before and after the command (values never default here)."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("connection")
    g.add_argument("--target", help=f"server host:port [env ADAPTERSERVE_TARGET; default {DEFAULT_TARGET}]")
    g.add_argument("--token", help="bearer token [env ADAPTERSERVE_TOKEN]")
    g.add_argument("--token-file", help="read the bearer token from this file")
    g.add_argument("--tls-ca", help="PEM CA bundle of the server certificate; enables TLS [env ADAPTERSERVE_TLS_CA]")
    g.add_argument("--tls-cert", help="PEM client certificate for mutual TLS [env ADAPTERSERVE_CLIENT_CERT]")
    g.add_argument("--tls-key", help="PEM client key for mutual TLS [env ADAPTERSERVE_CLIENT_KEY]")
    g.add_argument("--timeout", type=float,
                   help=f"deadline per call in seconds (default {DEFAULT_TIMEOUT:g}; "
                        f"{GENERATE_TIMEOUT:g} for generate and chat; 0 = none)")
    g.add_argument("--engine-app", help="against `python -m server.cluster`: its engine application "
                                        "(adapterserve-engine) for generate and chat, one hop fewer "
                                        "[env ADAPTERSERVE_ENGINE_APP]")
    g.add_argument("--lookaside", action="store_true",
                   help="against `python -m server.cluster`: lease the replica holding the adapter and "
                        "generate on its own gRPC server (no Ray hop per token) [env ADAPTERSERVE_LOOKASIDE=1]")
    return p


def _sampling_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling (unset = server default)")
    g.add_argument("-a", "--adapter", help="adapter id, or a weighted LoRA mix ID=W,ID=W (default: the base model)")
    g.add_argument("-n", "--max-new-tokens", type=int)
    g.add_argument("-t", "--temperature", type=float, help="0 = greedy (server default)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--system", help="system prompt (sends chat messages)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``adapterserve`` argument parser."""
    conn = _connection_options()
    sampling = _sampling_options()
    parser = argparse.ArgumentParser(
        prog="adapterserve", parents=[conn],
        description="Command-line client for an adapterserve server (one base model, many adapters).",
        epilog="Exit status: 0 ok, 1 the call failed, 2 bad usage, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", parents=[conn, sampling], help="generate a completion (streamed)",
                       description="Stream a completion to stdout.")
    g.add_argument("prompt", nargs="?", help="prompt text; '-' or omitted reads stdin")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    g.add_argument("--json", action="store_true", help="wait for the whole result and print it as JSON")
    g.add_argument("--logprobs", action="store_true", help="return and print per-token logprobs")
    g.add_argument("--top-logprobs", type=int, default=0, metavar="K", help="K alternatives per token (0..20)")
    g.add_argument("--request-id", help="request id (echoed back)")
    g.add_argument("--stats", action="store_true", help="print finish reason, usage and timings to stderr")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[conn, sampling], help="interactive chat (keeps history)",
                       description="Interactive chat; the whole conversation is sent each turn.\n" + CHAT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.set_defaults(func=cmd_chat)

    a = sub.add_parser("adapters", help="list, show, register, unregister adapters")
    asub = a.add_subparsers(dest="adapters_cmd", required=True, metavar="ACTION")
    al = asub.add_parser("list", parents=[conn], help="table of registered adapters")
    al.add_argument("--json", action="store_true")
    ash = asub.add_parser("show", parents=[conn], help="one adapter in detail")
    ash.add_argument("adapter_id")
    ash.add_argument("--json", action="store_true")
    ar = asub.add_parser("register", parents=[conn], help="register a PEFT adapter folder",
                         description="Register a PEFT adapter folder (needs the admin token if the server has one).")
    ar.add_argument("adapter_id")
    src = ar.add_mutually_exclusive_group(required=True)
    src.add_argument("--path", help="folder on the server, relative to its --adapter-root")
    src.add_argument("--local-dir", help="local folder; adapter_config.json + adapter_model.safetensors are uploaded")
    ar.add_argument("--merge", action="store_true", help="LoRA: fold into the base weights")
    ar.add_argument("--pin", action="store_true", help="never evict from the resident slots")
    ar.add_argument("--replace", action="store_true", help="replace an adapter with the same id")
    ar.add_argument("--json", action="store_true")
    au = asub.add_parser("unregister", parents=[conn], help="unregister an adapter")
    au.add_argument("adapter_id")
    a.set_defaults(func=cmd_adapters)

    h = sub.add_parser("health", parents=[conn], help="grpc.health.v1 status (exit 0 when SERVING)")
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.set_defaults(func=cmd_health)

    i = sub.add_parser("info", parents=[conn], help="served model and limits")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("metrics", parents=[conn], help="per-adapter summary of the Prometheus /metrics",
                       description="Fetch /metrics and print requests, tokens/s and p50/p99 latency per adapter.")
    m.add_argument("--metrics-url", help=f"default http://<target host>:{METRICS_PORT}/metrics "
                                         "[env ADAPTERSERVE_METRICS_URL]")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``adapterserve`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdapterServeError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.code.name == "UNAVAILABLE":
            print(f"(is the server running at {_target(args)}?)", file=sys.stderr)
        return 1
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `adapterserve generate ... | head -1`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

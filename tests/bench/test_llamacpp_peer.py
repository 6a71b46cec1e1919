"""bench/peers/llamacpp without llama.cpp: request shaping, stream parsing, the command line, the table,
pausing a process, and bench.load's shared stream runner (also against a real in-process server)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import httpx2
import pytest

from bench.load import LoadResult, RequestTimeout, run_load, run_streams
from bench.peers.llamacpp import (
    Contender,
    LlamaServer,
    PeerError,
    StuckServer,
    Workload,
    alternate,
    busy_threads,
    completion_body,
    completion_stream,
    event_tokens,
    find_llamacpp_tree,
    first_divergence,
    main,
    parse_sse,
    phase,
    result_rows,
    server_command,
    thread_cpu,
    workloads,
)


def test_workloads_base_rows_then_the_lora_row():
    rows = workloads([1, 16, 64], 4, 32, 8)
    assert [(w.name, w.streams, w.requests, w.adapters) for w in rows] == [
        ("1", 1, 4, 0), ("16", 16, 16, 0), ("64", 64, 64, 0), ("lora", 32, 32, 8)]
    assert rows[-1].label == "32 over 8 LoRA" and rows[0].label == "1"
    assert [w.name for w in workloads([2], 1, 0, 8)] == ["2"]  # --lora-streams 0: no LoRA row


def test_completion_body_is_greedy_forced_length_and_names_its_lora():
    body = completion_body([1, 2, 3], 64)
    assert body == {"prompt": [1, 2, 3], "n_predict": 64, "ignore_eos": True, "temperature": 0.0,
                    "stream": True, "return_tokens": True, "cache_prompt": True}
    with_lora = completion_body([7], 8, lora_id=5, stream=False)
    assert with_lora["lora"] == [{"id": 5, "scale": 1.0}] and with_lora["stream"] is False
    assert "lora" not in completion_body([7], 8, lora_id=None)


@pytest.mark.parametrize("line, expected", [
    ('data: {"content": "a", "tokens": [5]}', {"content": "a", "tokens": [5]}),
    ('data:{"stop": true}', {"stop": True}),
    ("data: [DONE]", None),
    ("", None),
    (": keep-alive", None),
    ("event: message", None),
])
def test_parse_sse(line, expected):
    assert parse_sse(line) == expected


def test_event_tokens_counts_partial_tokens_and_the_final_remainder():
    assert event_tokens({"tokens": [5], "stop": False}, 0) == 1
    assert event_tokens({"content": "", "tokens": []}, 3) == 0  # the stream's opening event
    # The final event of a stream carries no tokens; tokens_predicted says if any were not shown.
    assert event_tokens({"tokens": [], "stop": True, "tokens_predicted": 64}, 64) == 0
    assert event_tokens({"tokens": [], "stop": True, "tokens_predicted": 64}, 62) == 2
    with pytest.raises(PeerError, match="slot unavailable"):
        event_tokens({"error": {"message": "slot unavailable"}}, 0)


def test_server_command_threads_slots_and_loras(tmp_path):
    base = server_command(Path("/x/llama-server"), tmp_path / "m.gguf", 8123, 2, 64, 165)
    assert base[0] == "/x/llama-server"
    flags = dict(zip(base[1::2], base[2::2], strict=False))
    assert flags["-m"] == str(tmp_path / "m.gguf") and flags["--port"] == "8123" and flags["--host"] == "127.0.0.1"
    assert base[base.index("-t") + 1] == "2" and base[base.index("-tb") + 1] == "2"
    assert base[base.index("-np") + 1] == "64" and base[base.index("-c") + 1] == str(64 * 165)
    assert "--no-kv-unified" in base and "--lora" not in base and "--lora-init-without-apply" not in base
    loras = [tmp_path / f"l{i}.gguf" for i in range(3)]
    cmd = server_command(Path("llama-server"), tmp_path / "m.gguf", 1, 2, 32, 100, loras)
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--lora"] == [str(p) for p in loras]  # id i = loras[i]
    assert "--lora-init-without-apply" in cmd  # a request without "lora" gets the base model
    unified = server_command(Path("llama-server"), tmp_path / "m.gguf", 1, 2, 16, 100, kv_unified=True)
    assert "--kv-unified" in unified and "--no-kv-unified" not in unified


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([], [1]) == 0
    assert first_divergence([4, 5], [4, 5, 6]) == 2


def test_result_rows_medians_ratio_and_target():
    rows = [Workload("1", 1, 4), Workload("lora", 32, 32, 8)]
    tok_s = {"1": {"adapterserve": [30.0, 36.0, 35.0], "llama.cpp": [70.0, 72.0, 71.0]},
             "lora": {"adapterserve": [300.0, 310.0, 290.0], "llama.cpp": [90.0, 100.0, 110.0]}}
    table = result_rows(tok_s, rows, "llama.cpp F32")
    assert table[0] == {"concurrent streams": "1", "adapterserve": "35.0 tok/s", "llama.cpp F32": "71.0 tok/s",
                        "ratio": "0.49×", "target": "≥ 1× not met"}
    assert table[1]["ratio"] == "3.00×" and table[1]["target"] == "≥ 3× met"
    assert table[1]["concurrent streams"] == "32 over 8 LoRA"


def test_find_llamacpp_tree_above_the_binary_or_given(tmp_path):
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("")
    binary = tree / "build" / "bin" / "llama-server"
    binary.write_text("")
    link = tmp_path / "llama-server"
    link.symlink_to(binary)
    assert find_llamacpp_tree(link) == tree  # through the symlink build_llamacpp.sh leaves
    assert find_llamacpp_tree(tmp_path / "elsewhere" / "llama-server", tree) == tree
    assert find_llamacpp_tree(tmp_path / "elsewhere" / "llama-server") is None
    assert find_llamacpp_tree(link, tmp_path / "no-tree") is None


def test_main_without_a_peer_explains_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server on PATH
    monkeypatch.setattr("sys.argv", ["llamacpp"])
    assert main() == 2
    assert "build_llamacpp.sh" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["llamacpp", "--prepare-only", "--llama-cpp", str(tmp_path)])
    assert main() == 2  # a folder without llama.cpp's converters is no tree


def test_completion_stream_posts_the_body_and_counts_tokens():
    seen = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append((request.url.path, json.loads(request.content)))
        events = [{"content": "", "tokens": []}] + [{"content": "x", "tokens": [t], "stop": False} for t in (4, 5)]
        events.append({"content": "", "tokens": [], "stop": True, "tokens_predicted": 3})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        return httpx2.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def run() -> list[int]:
        async with httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://peer") as client:
            return [n async for n in completion_stream(client, completion_body([1, 2], 3, lora_id=2))]

    assert asyncio.run(run()) == [0, 1, 1, 1]  # the third token only known from tokens_predicted
    assert seen == [("/completion", completion_body([1, 2], 3, lora_id=2))]


def test_completion_stream_raises_on_an_error_status():
    transport = httpx2.MockTransport(lambda request: httpx2.Response(503, json={"error": "loading"}))

    async def run() -> None:
        async with httpx2.AsyncClient(transport=transport, base_url="http://peer") as client:
            async for _ in completion_stream(client, completion_body([1], 1)):
                pass

    with pytest.raises(httpx2.HTTPStatusError):
        asyncio.run(run())


def test_run_streams_counts_tokens_errors_and_latencies():
    async def stream(i: int):
        if i == 2:
            yield 1
            raise PeerError("boom")  # a failed request: an error, its token dropped
        yield 0  # an opening event without tokens: not the first token
        await asyncio.sleep(0.01)
        for _ in range(4):
            yield 1

    res = asyncio.run(run_streams(stream, 5, 2, (PeerError,)))
    assert isinstance(res, LoadResult)
    assert (res.requests, res.tokens, res.errors) == (5, 16, 1)
    assert len(res.ttft_s) == 4 and min(res.ttft_s) >= 0.01 and len(res.tpot_s) == 4


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_pause_and_resume_stop_and_continue_the_process():
    server = LlamaServer.__new__(LlamaServer)  # only the process handling, no llama-server
    server.proc = subprocess.Popen(["sleep", "30"])
    try:
        server.pause()
        for _ in range(100):
            if _state(server.proc.pid) == "T":
                break
            time.sleep(0.01)
        assert _state(server.proc.pid) == "T"
        server.resume()
        for _ in range(100):
            if _state(server.proc.pid) != "T":
                break
            time.sleep(0.01)
        assert _state(server.proc.pid) in "SR"
    finally:
        server.proc.kill()
        server.proc.wait()


def test_run_load_sends_token_id_prompts_to_a_real_server(start_server, tiny_llama):
    srv = start_server(tiny_llama, max_batch_size=4)
    ids = srv.app.model.tokenizer.encode("hello world")
    res = asyncio.run(run_load(srv.app.target, [ids, "hello world", ids], [""], 5, 2))
    assert (res.requests, res.tokens, res.errors) == (3, 15, 0)


def test_run_streams_ends_a_stuck_load_with_a_timeout_instead_of_hanging():
    started = []

    async def stream(i: int):
        started.append(i)
        yield 1
        if i == 1:
            await asyncio.sleep(3600)  # a server that stopped answering mid-stream
        yield 1

    with pytest.raises(RequestTimeout, match=r"request 1 of 4 .* within 0.2 s \(1 tokens so far\)"):
        asyncio.run(run_streams(stream, 4, 2, (PeerError,), timeout=0.2))
    res = asyncio.run(run_streams(lambda i: stream(0), 3, 3, (PeerError,), timeout=30))
    assert (res.tokens, res.errors) == (6, 0)  # a limit that is not reached changes nothing


def test_a_llama_server_that_stalls_mid_stream_is_a_named_error(tmp_path):
    """The shape of last session's hang: headers and one event, then nothing."""
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        event = b'data: {"content": "a", "tokens": [5], "stop": false}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + f"{len(event):x}\r\n".encode() + event + b"\r\n")
        await writer.drain()
        await asyncio.sleep(3600)

    peer = LlamaServer.__new__(LlamaServer)  # no llama-server: its client side only
    peer.proc = subprocess.Popen(["sleep", "30"])
    peer.request_timeout = 0.5

    async def run() -> None:
        server = await asyncio.start_server(stall, "127.0.0.1", 0)
        peer.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        peer.where = peer.url
        async with server:
            await peer.load([[1, 2]], [None], 4, 2, 2)

    try:
        with pytest.raises(StuckServer) as err, phase(peer, "round 1, 16 streams", peer.request_timeout):
            asyncio.run(run())
    finally:
        peer.proc.kill()
        peer.proc.wait()
    message = str(err.value)
    assert message.startswith(f"llama.cpp (pid {peer.proc.pid}, running, http://127.0.0.1:")
    assert "stuck in round 1, 16 streams: no complete answer within 0.5 s" in message
    assert "(1 tokens so far)" in message and "spin-wait" in message  # the likely cause, for llama.cpp only


def test_llama_server_greedy_timeout_becomes_a_timeout_error(monkeypatch):
    def slow(*args, **kwargs):
        raise httpx2.ReadTimeout("timed out")

    monkeypatch.setattr(httpx2, "post", slow)
    peer = LlamaServer.__new__(LlamaServer)
    peer.url, peer.request_timeout = "http://peer", 1.0
    with pytest.raises(TimeoutError, match="timed out"):
        peer.greedy([1], 4)


def test_busy_threads_counts_the_threads_that_computed():
    before = {1: 10.0, 2: 3.0, 3: 0.5}
    after = {1: 19.8, 2: 12.5, 3: 0.6, 4: 2.0}  # thread 4 started during the round
    assert busy_threads(before, after, 10.0) == [98, 95, 20]  # thread 3 (1%) is below the floor
    own = thread_cpu(os.getpid())
    assert os.getpid() in own and all(v >= 0 for v in own.values())  # the main thread's id is the pid
    assert thread_cpu(2**22 + 12345) == {}  # no such process


class _Fake(Contender):
    def __init__(self, name: str, log: list, tokens_short: int = 0, short_loads: int = 10**9):
        self.name, self.log, self.short, self.short_loads = name, log, tokens_short, short_loads
        self.proc = subprocess.Popen(["sleep", "60"])
        self.request_timeout = 5.0
        self.other: _Fake | None = None

    async def load(self, prompts, adapters, max_new, concurrency, requests) -> LoadResult:
        for _ in range(200):  # SIGSTOP is delivered asynchronously
            if _state(self.other.proc.pid) == "T":
                break
            await asyncio.sleep(0.005)
        self.log.append((self.name, tuple(adapters), concurrency, _state(self.other.proc.pid)))
        short = self.short if self.short_loads > 0 else 0
        self.short_loads -= 1
        return LoadResult(requests, requests * max_new - short, 0.5, [], [], 0)


def test_alternate_runs_each_load_with_the_other_server_stopped_in_alternating_order():
    log: list = []
    ours, peer = _Fake("adapterserve", log), _Fake("llama.cpp", log)
    ours.other, peer.other = peer, ours
    rows = [Workload("1", 1, 4), Workload("lora", 32, 32, 2)]
    tok_s: dict = {}
    busy: dict = {}
    try:
        alternate(ours, peer, rows, 2, [[1]], ["a", "b"], 8, tok_s, busy)
        assert [(n, a, c) for n, a, c, _ in log] == [
            ("adapterserve", ("",), 1), ("llama.cpp", (None,), 1),        # round 1, row 0: ours first
            ("llama.cpp", (0, 1), 32), ("adapterserve", ("a", "b"), 32),  # row 1: the peer first
            ("llama.cpp", (None,), 1), ("adapterserve", ("",), 1),        # round 2 starts the other way
            ("adapterserve", ("a", "b"), 32), ("llama.cpp", (0, 1), 32)]
        assert all(state == "T" for *_, state in log)  # the idle server was stopped during every load
        assert tok_s == {"1": {"adapterserve": [64.0, 64.0], "llama.cpp": [64.0, 64.0]},
                         "lora": {"adapterserve": [512.0, 512.0], "llama.cpp": [512.0, 512.0]}}
        assert set(busy) == {"1", "lora"} and set(busy["1"]) == {"adapterserve", "llama.cpp"}
        for proc in (ours.proc, peer.proc):  # both resumed at the end
            for _ in range(200):
                if _state(proc.pid) != "T":
                    break
                time.sleep(0.005)
            assert _state(proc.pid) in "SR"
        short = _Fake("llama.cpp", log, tokens_short=3)
        short.other, ours.other = ours, short
        with pytest.raises(RuntimeError, match=r"llama.cpp \(pid \d+, running\) in round 1, 1 streams: "
                                               r"0 errors \(\), 29 tokens \(expected 32\)"):
            alternate(ours, short, rows[:1], 1, [[1]], [], 8, {}, {})  # ours first, then the short peer (twice)
        short.proc.kill()
        once = _Fake("llama.cpp", log, tokens_short=3, short_loads=1)  # short once: that load runs again
        once.other, ours.other = ours, once
        tok_once: dict = {}
        alternate(ours, once, rows[:1], 1, [[1]], [], 8, tok_once, {})
        assert tok_once == {"1": {"adapterserve": [64.0], "llama.cpp": [64.0]}}
        once.proc.kill()
    finally:
        for proc in (ours.proc, peer.proc):
            proc.kill()
            proc.wait()

"""Every bad input gets a client status naming the field: malformed configs, safetensors headers,
tensor values, paths and protobuf bytes, through a real server, one table row each.

No row may answer INTERNAL or UNKNOWN, no message may echo file contents (a canary string sits in
the bad values), and the server serves the greedy reference afterwards.
"""

from __future__ import annotations

import json
import os
import struct

import grpc
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.reliability.conftest import N_NEW, running_server
from tests.serving import make_request

CANARY = "CANARY-7f3a"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
INVALID, NOT_FOUND, PRECONDITION, EXISTS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)


@pytest.fixture(scope="module")
def files(reliability_root):
    """{kind: (config dict, tensors)} of the valid adapters, for mutation."""
    out = {}
    for kind in ("lora", "prompt", "prefix"):
        folder = reliability_root / kind
        out[kind] = (json.loads((folder / "adapter_config.json").read_text()),
                     st_load((folder / "adapter_model.safetensors").read_bytes()))
    return out


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory, reliability_root):
    """An adapter root holding the path cases: loops, links out of the root, a FIFO, a valid copy."""
    root = tmp_path_factory.mktemp("bad-root")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.json").write_text(json.dumps({"peft_type": CANARY}))
    good = reliability_root / "lora"
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    for name, config, weights in [
        ("cfg_out", outside / "secret.json", good / "adapter_model.safetensors"),
        ("weights_loop", good / "adapter_config.json", None),
        ("fifo", None, good / "adapter_model.safetensors"),
        ("ok", good / "adapter_config.json", good / "adapter_model.safetensors"),
    ]:
        folder = root / name
        folder.mkdir()
        if name == "cfg_out":
            os.symlink(config, folder / "adapter_config.json")
        elif name == "fifo":
            os.mkfifo(folder / "adapter_config.json")
        else:
            (folder / "adapter_config.json").write_bytes(config.read_bytes())
        if weights is None:
            os.symlink("adapter_model.safetensors", folder / "adapter_model.safetensors")
        else:
            (folder / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    return root


@pytest.fixture(scope="module")
def server(tiny_llama, bad_root):
    with running_server(tiny_llama, adapter_root=str(bad_root), kv_cache_tokens=2048,
                        default_max_new_tokens=N_NEW) as srv:
        yield srv


# ------------------------------------------------------------------------------------------ row builders


def upload(kind: str, config=None, tensors=None, raw_weights: bytes | None = None):
    """A RegisterAdapterRequest uploading `kind` mutated by `config(c)` / `tensors(t)` (each edits in place)."""
    def build(files) -> pb.RegisterAdapterRequest:
        c, t = json.loads(json.dumps(files[kind][0])), {k: v.clone() for k, v in files[kind][1].items()}
        if config is not None:
            config(c)
        if tensors is not None:
            tensors(t)
        body = raw_weights if raw_weights is not None else st_save(t)
        cfg = c if isinstance(c, bytes) else json.dumps(c).encode()
        return pb.RegisterAdapterRequest(adapter_id="bad", files=pb.AdapterFiles(config_json=cfg, safetensors=body))
    return build


def cfg_set(**fields):
    return lambda c: c.update(fields)


def poke(name: str, value: float, dtype=None):
    def mutate(t):
        if dtype is not None:
            t[name] = t[name].to(dtype)
        t[name].view(-1)[3] = value
    return mutate


def header_file(header: dict, body: bytes = b"\0" * 16) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def entry(shape, start=0, end=16, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def raw_header(text: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text + body


def raw_config(config_json: bytes):
    return lambda files: pb.RegisterAdapterRequest(adapter_id="bad", files=pb.AdapterFiles(
        config_json=config_json, safetensors=st_save(files["lora"][1])))


def by_path(path: str, adapter_id: str = "bad"):
    return lambda files: pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path)


DEEP = b"[" * 100_000 + b"]" * 100_000

# (id, build(files) -> RegisterAdapterRequest, expected code, fragment the message must hold)
REGISTER_ROWS = [
    # wrong JSON types and absurd numbers in adapter_config.json
    ("peft_type_list", upload("lora", cfg_set(peft_type=[CANARY])), INVALID, "peft_type must be a string, got a list"),
    ("alpha_string", upload("lora", cfg_set(lora_alpha=CANARY)), INVALID,
     "lora_alpha must be a finite number, got a string"),
    ("r_string", upload("lora", cfg_set(r="4")), INVALID, "r must be an integer >= 1, got a string"),
    ("r_float", upload("lora", cfg_set(r=4.5)), INVALID, "r must be an integer >= 1, got 4.5"),
    ("alpha_nan", upload("lora", cfg_set(lora_alpha=float("nan"))), INVALID, "lora_alpha must be a finite number"),
    ("alpha_inf", upload("lora", cfg_set(lora_alpha=float("inf"))), INVALID, "lora_alpha must be a finite number"),
    ("alpha_1e308", upload("lora", cfg_set(lora_alpha=1e308)), INVALID,
     "lora_alpha: gives model.layers.0.mlp.down_proj a scaling of 2.5e+307"),
    ("alpha_huge_int", upload("lora", cfg_set(lora_alpha=10**400)), INVALID,
     "lora_alpha must be a finite number"),
    ("alpha_pattern_absurd", upload("lora", cfg_set(alpha_pattern={"q_proj": 1e6})), INVALID,
     "alpha_pattern['q_proj']: gives model.layers.0.self_attn.q_proj a scaling of 250000"),
    ("alpha_pattern_nan", upload("lora", cfg_set(alpha_pattern={"q_proj": float("nan")})), INVALID,
     "alpha_pattern must be an object mapping module patterns to finite numbers"),
    ("rank_pattern_string", upload("lora", cfg_set(rank_pattern={"q_proj": "2"})), INVALID,
     "rank_pattern must be an object mapping module patterns to integers >= 1"),
    ("rank_pattern_list", upload("lora", cfg_set(rank_pattern=[CANARY])), INVALID, "rank_pattern must be"),
    ("rank_pattern_backtracking", upload("lora", cfg_set(rank_pattern={r"(.*?)*(.*?)*(.*?)*\.[a-z]_": 4})), INVALID,
     "rank_pattern: pattern '(.*?)*(.*?)*(.*?)*\\\\.[a-z]_' takes more than"),
    ("alpha_pattern_compile_bomb", upload("lora", cfg_set(alpha_pattern={"(?:a{65535}){65535}": 4})), INVALID,
     "alpha_pattern: pattern '(?:a{65535}){65535}' repeats too much"),
    ("alpha_pattern_long", upload("lora", cfg_set(alpha_pattern={"a" * 300: 4})), INVALID,
     "alpha_pattern: pattern 'aaaa"),
    ("alpha_pattern_bad_regex", upload("lora", cfg_set(alpha_pattern={"(": 4})), INVALID,
     "alpha_pattern has an invalid pattern '('"),
    ("target_modules_number", upload("lora", cfg_set(target_modules=5)), INVALID,
     "target_modules must be a string, a list of strings or null, got 5"),
    ("target_modules_bad_regex", upload("lora", cfg_set(target_modules="([")), INVALID,
     "target_modules has an invalid pattern"),
    ("use_rslora_string", upload("lora", cfg_set(use_rslora="yes")), INVALID, "use_rslora must be true or false"),
    ("virtual_tokens_string", upload("prompt", cfg_set(num_virtual_tokens="4")), INVALID,
     "num_virtual_tokens must be an integer >= 1, got a string"),
    ("token_dim_object", upload("prefix", cfg_set(token_dim={"a": CANARY})), INVALID,
     "token_dim must be an integer >= 1, got an object"),
    ("config_deep", raw_config(b'{"peft_type": "LORA", "x": ' + DEEP + b"}"), INVALID,
     "adapter_config.json is not valid JSON: nested too deeply"),
    ("config_nan_literal", raw_config(b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'), INVALID,
     "lora_alpha must be a finite number, got nan"),
    # non-finite and absurd tensor values, named
    ("tensor_nan", upload("lora", tensors=poke(Q_A, float("nan"))), INVALID, f"tensor {Q_A} holds NaN"),
    ("tensor_inf", upload("prompt", tensors=poke("prompt_embeddings", float("-inf"))), INVALID,
     "tensor prompt_embeddings holds inf"),
    ("tensor_huge", upload("prefix", tensors=poke("prompt_embeddings", 1e30)), INVALID,
     "tensor prompt_embeddings holds a value of magnitude 1e+30"),
    ("tensor_nan_f16", upload("lora", tensors=poke(Q_A, float("nan"), torch.float16)), INVALID,
     f"tensor {Q_A} holds NaN"),
    ("tensor_inf_bf16", upload("prompt", tensors=poke("prompt_embeddings", float("inf"), torch.bfloat16)), INVALID,
     "tensor prompt_embeddings holds inf"),
    # malformed safetensors headers
    ("shape_negative", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([-1, -4])})), INVALID,
     "tensor prompt_embeddings has a bad shape"),
    ("shape_fraction", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([2.5, 1.6])})), INVALID,
     "tensor prompt_embeddings has a bad shape"),
    ("shape_bool", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([True, 4])})), INVALID,
     "tensor prompt_embeddings has a bad shape"),
    ("shape_string", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry(CANARY)})), INVALID,
     "tensor prompt_embeddings has a bad shape"),
    ("offsets_float", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([4], 0.0, 16.0)})),
     INVALID, "tensor prompt_embeddings has bad data_offsets"),
    ("offsets_string", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([4], "0", "16")})),
     INVALID, "tensor prompt_embeddings has bad data_offsets"),
    ("offsets_reversed", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([0], 16, 0)})),
     INVALID, "tensor prompt_embeddings has bad data_offsets"),
    ("offsets_overlap", upload("prompt", raw_weights=header_file(
        {"a": entry([4], 0, 16), "prompt_embeddings": entry([2], 8, 16)})), INVALID,
     "tensor prompt_embeddings overlaps the previous tensor"),
    ("offsets_gap", upload("prompt", raw_weights=header_file(
        {"a": entry([2], 0, 8), "prompt_embeddings": entry([1], 12, 16)})), INVALID,
     "tensor prompt_embeddings leaves a gap before it"),
    ("bytes_mismatch", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([3])})), INVALID,
     "prompt_embeddings does not fit its bytes"),
    ("too_many_dims", upload("prompt", raw_weights=header_file({"prompt_embeddings": entry([1] * 9 + [4])})),
     INVALID, "tensor prompt_embeddings has a bad shape (at most 8 integers >= 0)"),
    ("header_deep", upload("prompt", raw_weights=raw_header(DEEP)), INVALID, "unreadable header"),
    ("header_list", upload("prompt", raw_weights=raw_header(b"[1, 2]")), INVALID, "the header is not a JSON object"),
    ("header_entry_scalar", upload("prompt", raw_weights=header_file({"prompt_embeddings": CANARY})), INVALID,
     "bad entry for prompt_embeddings"),
    ("metadata_nested", upload("prompt", raw_weights=header_file(
        {"__metadata__": {"k": {"x": CANARY}}, "prompt_embeddings": entry([4])})), INVALID, "__metadata__"),
    ("header_not_utf8", upload("prompt", raw_weights=raw_header(b'{"\xff": 1}')), INVALID, "unreadable header"),
    # paths
    ("path_symlink_loop", by_path("loop_a"), INVALID, "path 'loop_a' cannot be resolved: a symlink loop"),
    ("path_too_long", by_path("a/" * 600), INVALID, "path is too long"),
    ("path_component_too_long", by_path("x" * 300), INVALID, "path is too long"),
    ("path_file_links_out", by_path("cfg_out"), INVALID,
     "adapter_config.json is a symlink leading outside the adapter root"),
    ("path_file_loop", by_path("weights_loop"), INVALID, "adapter_model.safetensors cannot be opened: a symlink loop"),
    ("path_fifo", by_path("fifo"), INVALID, "adapter_config.json is not a regular file"),
    ("path_missing", by_path("nope"), INVALID, "path 'nope' is not an adapter folder"),
    ("path_escape", by_path("../x"), INVALID, "contains '..'"),
    ("bad_id", lambda files: pb.RegisterAdapterRequest(adapter_id="a/b", path="ok"), INVALID, "adapter_id 'a/b'"),
    ("no_source", lambda files: pb.RegisterAdapterRequest(adapter_id="x"), INVALID, "source: give path or files"),
    # other client statuses
    ("merge_prompt", lambda files: pb.RegisterAdapterRequest(adapter_id="m", files=pb.AdapterFiles(
        config_json=json.dumps(files["prompt"][0]).encode(), safetensors=st_save(files["prompt"][1])), merge=True),
     PRECONDITION, "merge: only LORA, DORA, IA3 adapters can be merged, not PROMPT_TUNING"),
    ("exists", by_path("ok", adapter_id="ok"), EXISTS, "adapter_id 'ok' is already registered"),
]


@pytest.mark.parametrize("build,code,fragment", [r[1:] for r in REGISTER_ROWS], ids=[r[0] for r in REGISTER_ROWS])
def test_register_refused_with_client_status(server, files, build, code, fragment):
    if code == EXISTS:
        _ensure_ok(server)
    with pytest.raises(grpc.RpcError) as err:
        server.adapters.RegisterAdapter(build(files), timeout=60)
    assert (err.value.code(), fragment) == (code, fragment) and fragment in err.value.details(), err.value.details()
    assert CANARY not in err.value.details()


def _ensure_ok(server):
    try:
        server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="ok", path="ok"), timeout=60)
    except grpc.RpcError as e:
        assert e.code() == EXISTS


GOOD_GENERATE = make_request("hello", max_new_tokens=2).SerializeToString()
GOOD_REGISTER = pb.RegisterAdapterRequest(adapter_id="x", path="ok").SerializeToString()
GEN, STREAM = "/adapterserve.v1.GenerationService/Generate", "/adapterserve.v1.GenerationService/GenerateStream"
REG, GET = "/adapterserve.v1.AdapterService/RegisterAdapter", "/adapterserve.v1.AdapterService/GetAdapter"

# (id, method, raw request bytes, expected code, fragment)
BYTES_ROWS = [
    ("generate_prompt_not_utf8", GEN, GOOD_GENERATE.replace(b"hello", b"h\xffllo"), INVALID,
     "malformed adapterserve.v1.GenerateRequest message"),
    ("stream_prompt_not_utf8", STREAM, GOOD_GENERATE.replace(b"hello", b"he\xc3\x28o"), INVALID,
     "malformed adapterserve.v1.GenerateRequest message"),
    ("generate_truncated", GEN, GOOD_GENERATE[:-1], INVALID, "malformed adapterserve.v1.GenerateRequest"),
    ("generate_bad_varint", GEN, b"\x08" + b"\xff" * 11, INVALID, "malformed adapterserve.v1.GenerateRequest"),
    ("register_path_not_utf8", REG, GOOD_REGISTER.replace(b"ok", b"\xfe\xff"), INVALID,
     "malformed adapterserve.v1.RegisterAdapterRequest"),
    ("get_garbage", GET, b"\xff\xff\xff\xff", INVALID, "malformed adapterserve.v1.GetAdapterRequest"),
    ("generate_unknown_adapter", GEN, make_request("hi", adapter_id="ghost").SerializeToString(), NOT_FOUND,
     "adapter_id 'ghost' is not registered"),
    ("generate_nan_temperature", GEN, make_request("hi", temperature=float("nan")).SerializeToString(), INVALID,
     "params.temperature"),
    ("generate_empty", GEN, b"", INVALID, "input: one of prompt, messages or prompt_token_ids is required"),
]


@pytest.mark.parametrize("method,data,code,fragment", [r[1:] for r in BYTES_ROWS], ids=[r[0] for r in BYTES_ROWS])
def test_protobuf_bytes_get_client_status(server, method, data, code, fragment):
    if method == STREAM:
        call = server.channel.unary_stream(method)
        with pytest.raises(grpc.RpcError) as err:
            list(call(data, timeout=30))
    else:
        with pytest.raises(grpc.RpcError) as err:
            server.channel.unary_unary(method)(data, timeout=30)
    assert err.value.code() == code and fragment in err.value.details(), (err.value.code(), err.value.details())


def test_unregister_unknown_is_not_found(server):
    with pytest.raises(grpc.RpcError) as err:
        server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="ghost"), timeout=30)
    assert err.value.code() == NOT_FOUND and "adapter_id 'ghost' is not registered" in err.value.details()


def test_tiny_temperature_is_greedy_and_server_still_serves(server, greedy_refs):
    prompts, refs = greedy_refs
    for t in (1e-37, 1e-30, 0.0):
        resp = server.generate(token_ids=prompts[0], max_new_tokens=N_NEW, ignore_eos=True, temperature=t)
        assert list(resp.token_ids) == refs[None][0], t
    assert server.app.engine.num_active() == 0

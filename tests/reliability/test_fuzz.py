"""Property-based fuzzing of the gRPC surface (hypothesis, derandomized, bounded example counts):
no GenerateRequest, RegisterAdapterRequest or raw byte string yields UNKNOWN or INTERNAL, and the
server still answers the greedy reference afterwards."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.reliability.conftest import N_NEW, running_server

SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
METHODS = {
    "/adapterserve.v1.GenerationService/Generate": False,
    "/adapterserve.v1.GenerationService/GenerateStream": True,
    "/adapterserve.v1.GenerationService/GetModelInfo": False,
    "/adapterserve.v1.AdapterService/RegisterAdapter": False,
    "/adapterserve.v1.AdapterService/UnregisterAdapter": False,
    "/adapterserve.v1.AdapterService/GetAdapter": False,
    "/adapterserve.v1.AdapterService/ListAdapters": False,
}


@pytest.fixture(scope="module")
def server(tiny_llama, reliability_root):
    with running_server(tiny_llama, adapter_root=str(reliability_root), kv_cache_tokens=2048,
                        default_max_new_tokens=4, max_queue=64) as srv:
        srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="lora", path="lora"), timeout=60)
        yield srv


@pytest.fixture(scope="module")
def lora_files(reliability_root):
    folder = reliability_root / "lora"
    return (json.loads((folder / "adapter_config.json").read_text()),
            st_load((folder / "adapter_model.safetensors").read_bytes()))


def call_status(fn, request, streaming=False) -> grpc.StatusCode:
    try:
        out = fn(request, timeout=30)
        if streaming:
            list(out)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


floats32 = st.floats(width=32)
u32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
params = st.builds(
    pb.SamplingParams,
    max_new_tokens=st.one_of(st.none(), st.integers(0, 6), st.integers(0, 2**32 - 1)),
    temperature=st.one_of(st.none(), floats32), top_k=st.one_of(st.none(), u32), top_p=st.one_of(st.none(), floats32),
    repetition_penalty=st.one_of(st.none(), floats32), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(st.text(max_size=4), max_size=3), ignore_eos=st.booleans())
messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool", "x", ""]),
                              content=st.text(max_size=30)), max_size=3)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(adapter_id=draw(st.sampled_from(["", "lora", "ghost", "a/b", "\u00e9"])),
                             params=draw(params), return_logprobs=draw(st.booleans()), top_logprobs=draw(u32),
                             request_id=draw(st.text(max_size=10)))
    which = draw(st.sampled_from(["prompt", "messages", "ids", "none"]))
    if which == "prompt":
        req.prompt = draw(st.text(max_size=40))
    elif which == "messages":
        req.messages.messages.extend(draw(messages))
    elif which == "ids":
        req.prompt_token_ids.ids.extend(draw(st.lists(u32, max_size=12)))
    return req


@FUZZ
@given(req=generate_requests(), stream=st.booleans())
def test_fuzz_generate(server, req, stream):
    fn = server.gen.GenerateStream if stream else server.gen.Generate
    assert call_status(fn, req, stream) not in SERVER_ERRORS


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-2**70, 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
CONFIG_FIELDS = ["peft_type", "task_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                 "target_modules", "layers_to_transform", "bias", "init_lora_weights", "use_dora",
                 "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "modules_to_save"]


@st.composite
def register_requests(draw, lora_files) -> pb.RegisterAdapterRequest:
    req = pb.RegisterAdapterRequest(adapter_id=draw(st.sampled_from(["fz", "fz.2", "", "..", "a b", "x" * 200])),
                                    merge=draw(st.booleans()), pin=draw(st.booleans()), replace=draw(st.booleans()))
    source = draw(st.sampled_from(["path", "files", "raw"]))
    if source == "path":
        req.path = draw(st.sampled_from(["lora", "prompt", "/etc", "../x", "lora/../lora", "nope", ""])
                        | st.text(max_size=30))
    elif source == "raw":
        req.files.config_json = draw(st.binary(max_size=64))
        req.files.safetensors = draw(st.binary(max_size=64))
    else:
        config, tensors = lora_files
        config = dict(config)
        for field in draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=2)):
            config[field] = draw(json_values)
        weights = bytearray(st_save(tensors))
        for pos in draw(st.lists(st.integers(0, len(weights) - 1), max_size=3)):
            weights[pos] = draw(st.integers(0, 255))
        req.files.config_json = json.dumps(config).encode()
        req.files.safetensors = bytes(weights)
    return req


@FUZZ
@given(data=st.data())
def test_fuzz_register(server, lora_files, data):
    req = data.draw(register_requests(lora_files))
    code = call_status(server.adapters.RegisterAdapter, req)
    assert code not in SERVER_ERRORS
    if code == grpc.StatusCode.OK:  # keep the server's state: a merged adapter would change base outputs
        server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=req.adapter_id), timeout=30)


# AdapterHub's bottleneck format: the BnConfig fields the server reads, and the top-level hidden_size.
BOTTLENECK_FIELDS = ["architecture", "configs", "is_parallel", "ln_before", "ln_after", "use_gating", "phm_layer",
                     "inv_adapter", "cross_adapter", "mh_adapter", "output_adapter", "original_ln_before",
                     "original_ln_after", "residual_before_ln", "non_linearity", "scaling", "hidden_size"]


@pytest.fixture(scope="module")
def bottleneck_files(tiny_llama):
    """A valid Houlsby adapter in AdapterHub's format (as `training --method bottleneck` writes it)."""
    import torch

    from training.bottleneck import FORMAT_VERSION, hub_config

    base = json.loads((tiny_llama / "config.json").read_text())
    hidden, width = base["hidden_size"], base["hidden_size"] // 8
    config = {"config": hub_config("houlsby", 8), "hidden_size": hidden, "model_class": "LlamaForCausalLM",
              "model_name": "tiny", "model_type": "llama", "name": "bn", "version": FORMAT_VERSION}
    g = torch.Generator().manual_seed(0)
    shapes = {"adapter_down.0.weight": (width, hidden), "adapter_down.0.bias": (width,),
              "adapter_up.weight": (hidden, width), "adapter_up.bias": (hidden,)}
    tensors = {f"model.layers.{i}.{site}.adapters.bn.{name}": torch.randn(*shape, generator=g) * 0.1
               for i in range(base["num_hidden_layers"]) for site in ("attention_adapters", "output_adapters")
               for name, shape in shapes.items()}
    return config, st_save(tensors)


def test_the_unfuzzed_bottleneck_registers(server, bottleneck_files):
    config, weights = bottleneck_files
    files = pb.AdapterFiles(config_json=json.dumps(config).encode(), safetensors=weights)
    info = server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="bn-ok", files=files), timeout=60)
    assert info.type == pb.BOTTLENECK
    server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="bn-ok"), timeout=30)


@FUZZ
@given(data=st.data())
def test_fuzz_bottleneck_config(server, bottleneck_files, data):
    """Any value in the fields the server reads: registered, or INVALID_ARGUMENT naming one of those fields."""
    config, weights = bottleneck_files
    config = json.loads(json.dumps(config))
    fields = data.draw(st.lists(st.sampled_from(BOTTLENECK_FIELDS), min_size=1, max_size=2, unique=True))
    for field in fields:
        (config if field == "hidden_size" else config["config"])[field] = data.draw(json_values)
    files = pb.AdapterFiles(config_json=json.dumps(config).encode(), safetensors=weights)
    try:
        server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="fz-bn", files=files), timeout=60)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, e.code(), e.details())
        named = [f if f == "hidden_size" else f"config.{f}" for f in fields]
        assert any(name in e.details() for name in named), (fields, e.details())
    else:
        server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="fz-bn"), timeout=30)


@settings(FUZZ, max_examples=80)
@given(method=st.sampled_from(sorted(METHODS)), data=st.binary(max_size=96))
def test_fuzz_raw_bytes(server, method, data):
    streaming = METHODS[method]
    call = server.channel.unary_stream(method) if streaming else server.channel.unary_unary(method)
    code = call_status(call, data, streaming)
    assert code not in SERVER_ERRORS
    if method.endswith("RegisterAdapter") and code == grpc.StatusCode.OK:
        server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(
            adapter_id=pb.RegisterAdapterRequest.FromString(data).adapter_id), timeout=30)


def test_server_answers_correctly_after_fuzzing(server, greedy_refs):
    """Runs after the fuzz tests (file order): the base model's greedy output is still PEFT's."""
    prompts, refs = greedy_refs
    for i, p in enumerate(prompts):
        resp = server.generate(token_ids=p, max_new_tokens=N_NEW, ignore_eos=True)
        assert list(resp.token_ids) == refs[None][i]
    assert server.app.engine.num_active() == 0
    assert server.app.engine.allocator.free_pages == server.app.engine.allocator.num_pages

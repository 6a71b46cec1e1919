"""--register HOST:PORT uploads the two adapter files to AdapterService.RegisterAdapter."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from tests.training.conftest import run_cli, train_ok


class FakeAdapterService(pb_grpc.AdapterServiceServicer):
    """Records RegisterAdapter calls; refuses them when `refuse` is set."""

    def __init__(self, refuse: str = ""):
        self.requests: list[pb.RegisterAdapterRequest] = []
        self.metadata: list[dict] = []
        self.refuse = refuse

    def RegisterAdapter(self, request, context):  # noqa: N802 (gRPC method name)
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.refuse:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.refuse)
        return pb.Adapter(adapter_id=request.adapter_id, type=pb.LORA, rank=8,
                          size_bytes=len(request.files.safetensors), state=pb.REGISTERED)


@pytest.fixture
def fake_server():
    def start(refuse: str = ""):
        servicer = FakeAdapterService(refuse)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_AdapterServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return servicer, f"127.0.0.1:{port}"

    started: list = []
    yield start
    for s in started:
        s.stop(0)


def _sft(tiny, data_dir, out, *extra):
    return ("sft", "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", out, "--max-steps", 2,
            "--save-steps", 1000, *extra)


def test_register_uploads_the_saved_files(tiny, data_dir, tmp_path, fake_server, capsys):
    servicer, target = fake_server()
    out = tmp_path / "my-adapter"
    train_ok(*_sft(tiny, data_dir, out, "--register", target, "--register-token", "s3cret", "--register-replace"))
    (request,) = servicer.requests
    assert request.adapter_id == "my-adapter"  # default: the output folder's name
    assert request.replace is True
    assert request.files.config_json == (out / "adapter_config.json").read_bytes()
    assert request.files.safetensors == (out / "adapter_model.safetensors").read_bytes()
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"
    assert "registered 'my-adapter'" in capsys.readouterr().out
    assert "s3cret" not in (out / "training_config.yaml").read_text()  # secrets are not written down


def test_register_token_from_environment(tiny, data_dir, tmp_path, fake_server, monkeypatch):
    servicer, target = fake_server()
    monkeypatch.setenv("ADAPTERSERVE_TOKEN", "from-env")
    train_ok(*_sft(tiny, data_dir, tmp_path / "a", "--register", target, "--adapter-id", "x1"))
    assert servicer.requests[0].adapter_id == "x1"
    assert servicer.metadata[0]["authorization"] == "Bearer from-env"


def test_refused_registration_exits_1_and_keeps_the_adapter(tiny, data_dir, tmp_path, fake_server, capsys):
    _, target = fake_server(refuse="rank 8 exceeds max_lora_rank 4")
    out = tmp_path / "b"
    assert run_cli(*_sft(tiny, data_dir, out, "--register", target, "--adapter-id", "b")) == 1
    captured = capsys.readouterr()
    assert "INVALID_ARGUMENT: rank 8 exceeds max_lora_rank 4" in captured.out + captured.err
    assert (out / "adapter_model.safetensors").is_file()


def test_bad_adapter_id_refused_before_training(data_dir, tmp_path, capsys):
    code = run_cli("sft", "--data", data_dir / "sft.jsonl", "--output", tmp_path / "o", "--register",
                   "127.0.0.1:1", "--adapter-id", "../evil")
    assert code == 2 and "--adapter-id '../evil'" in capsys.readouterr().err


def test_reward_model_cannot_be_registered(data_dir, tmp_path, capsys):
    code = run_cli("reward", "--data", data_dir / "prefs.jsonl", "--output", tmp_path / "o", "--register",
                   "127.0.0.1:1")
    assert code == 2 and "not a generation adapter" in capsys.readouterr().err


# ---------------------------------------------------------------- against the real server

METHODS = {
    "lora": ["--lr", 3e-3],
    "prompt": ["--num-virtual-tokens", 4, "--lr", 1e-1],
    "ptuning": ["--num-virtual-tokens", 4, "--encoder-hidden-size", 32, "--lr", 1e-2],
    "prefix": ["--num-virtual-tokens", 4, "--projection", "--encoder-hidden-size", 32, "--lr", 1e-2],
}
KIND = {"lora": pb.LORA, "prompt": pb.PROMPT_TUNING, "ptuning": pb.P_TUNING, "prefix": pb.PREFIX_TUNING}


@pytest.mark.parametrize("method", list(METHODS))
def test_trained_adapter_served_equals_peft(method, tiny, data_dir, tmp_path, start_server):
    """Train, register with a running server, and compare its greedy output with PEFT's forward pass."""
    from transformers import AutoTokenizer

    from tests.peft_reference import peft_greedy_reference

    server = start_server(tiny, kv_cache_tokens=4096)
    out = tmp_path / method
    train_ok("sft", "--method", method, "--model", tiny, "--data", data_dir / "sft.jsonl", "--output", out,
             "--max-steps", 20, "--save-steps", 1000, "--seed", 0, *METHODS[method],
             "--register", server.app.target, "--adapter-id", f"trained-{method}")
    info = server.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id=f"trained-{method}"))
    assert info.type == KIND[method]
    tok = AutoTokenizer.from_pretrained(str(tiny))
    changed = False
    for text in ["<|im_start|>user\nwhat is 2 plus 5?<|im_end|>\n<|im_start|>assistant\n", "hello world"]:
        ids = tok.encode(text)
        want, _ = peft_greedy_reference(tiny, out, ids, 8)
        got = server.generate(token_ids=ids, adapter_id=f"trained-{method}", max_new_tokens=8, ignore_eos=True)
        assert list(got.token_ids) == want
        base = server.generate(token_ids=ids, max_new_tokens=8, ignore_eos=True)
        changed |= list(base.token_ids) != want
    assert changed, "the trained adapter must change the served output"

"""Run a real adapterserve server in-process on free ports (the `start_server` fixture lives in conftest)."""

from __future__ import annotations

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from server.app import ServerApp
from server.config import ServerConfig


class Running:
    """A started server plus blocking stubs to it."""

    def __init__(self, app: ServerApp):
        self.app = app
        self.channel = grpc.insecure_channel(app.target)
        self.gen = pb_grpc.GenerationServiceStub(self.channel)
        self.adapters = pb_grpc.AdapterServiceStub(self.channel)

    def generate(self, prompt=None, adapter_id="", timeout=60, **params) -> pb.GenerateResponse:
        return self.gen.Generate(make_request(prompt, adapter_id, **params), timeout=timeout)

    def close(self) -> None:
        self.channel.close()
        self.app.stop(grace=2)


def make_request(prompt=None, adapter_id="", token_ids=None, messages=None, logprobs=False, top_logprobs=0,
                 **params) -> pb.GenerateRequest:
    req = pb.GenerateRequest(adapter_id=adapter_id, params=pb.SamplingParams(**params),
                             return_logprobs=logprobs, top_logprobs=top_logprobs)
    if prompt is not None:
        req.prompt = prompt
    if token_ids is not None:
        req.prompt_token_ids.ids.extend(token_ids)
    if messages is not None:
        req.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    return req


def start_server_fixture():
    """start_server(model_dir, **config) -> Running; stopped at teardown."""
    started: list[Running] = []

    def start(model_dir, **overrides) -> Running:
        cfg = ServerConfig(**{"model": str(model_dir), "port": 0, "metrics_port": 0, "http_port": 0, "threads": 2, **overrides})
        cfg.validate()
        running = Running(ServerApp(cfg).start())
        started.append(running)
        return running

    yield start
    for r in started:
        r.close()

"""Adapter admin over HTTP, mirroring AdapterService: vLLM's load/unload endpoints and /v1/adapters.

Mutating endpoints need the admin token when one is configured (403 with the plain token), the
same rule as RegisterAdapter/UnregisterAdapter over gRPC; paths resolve under --adapter-root with
the same containment rules (the gRPC servicer's own ``register_blocking`` does the work).
Thread domain: handlers on the event loop; registration runs in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from google.protobuf.json_format import MessageToDict

from adapterserve.v1 import adapterserve_pb2 as pb
from server.api.adapters import AdapterOpError, adapter_message, run_adapter_op
from server.api.http.errors import OpenAIError
from server.api.http.schemas import LoadLoraRequest, RegisterAdapterBody, UnloadLoraRequest


def _adapter_json(message: pb.Adapter) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


async def _call(fn, *args):
    """Run an adapter operation as AdapterService does (``run_adapter_op``); its status becomes an OpenAI error."""
    try:
        return await run_adapter_op(fn, *args)
    except AdapterOpError as e:
        param = "lora_name" if e.code == grpc.StatusCode.NOT_FOUND else None
        raise OpenAIError.from_status(e.code, e.message, param=param,
                                      code="adapter_not_found" if param else None) from e


def admin_router(ctx, authorize: Callable[[Request, str | None], None]) -> APIRouter:
    """Routes for ``ctx.adapter_service`` (an AdapterServicer); ``authorize(request, admin_call)`` raises on denial."""
    router = APIRouter()
    service = ctx.adapter_service

    @router.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
        authorize(request, "load_lora_adapter")
        req = pb.RegisterAdapterRequest(adapter_id=body.lora_name, path=body.lora_path)
        await _call(service.register_blocking, req)
        return PlainTextResponse(f"Success: adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
        authorize(request, "unload_lora_adapter")
        await _call(service.manager.unregister, body.lora_name)
        return PlainTextResponse(f"Success: adapter '{body.lora_name}' removed successfully.")

    @router.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"object": "list", "data": [_adapter_json(adapter_message(e)) for e in service.manager.list()]}

    @router.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str) -> dict:
        return _adapter_json(await _call(lambda: adapter_message(service.manager.get(adapter_id))))

    @router.post("/v1/adapters")
    async def register(body: RegisterAdapterBody, request: Request) -> dict:
        authorize(request, "RegisterAdapter")
        req = pb.RegisterAdapterRequest(adapter_id=body.id, merge=body.merge, pin=body.pin, replace=body.replace)
        if (body.path is None) == (body.files is None):
            raise OpenAIError(400, "path: give path or files (not both)", param="path")
        if body.path is not None:
            req.path = body.path
        else:
            try:
                weights = base64.b64decode(body.files.safetensors_b64, validate=True)
            except (binascii.Error, ValueError):
                raise OpenAIError(400, "files.safetensors_b64: not valid base64",
                                  param="files.safetensors_b64") from None
            req.files.CopyFrom(pb.AdapterFiles(config_json=body.files.config_json.encode(), safetensors=weights))
        return _adapter_json(await _call(service.register_blocking, req))

    @router.delete("/v1/adapters/{adapter_id}")
    async def unregister(adapter_id: str, request: Request) -> dict:
        authorize(request, "UnregisterAdapter")
        entry = await _call(service.manager.unregister, adapter_id)
        return {"id": entry.adapter_id, "object": "adapter", "deleted": True}

    return router

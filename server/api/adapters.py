"""AdapterService: register / unregister / list / get adapters while the server runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from server.adapters.catalog import AdapterCatalog, AdapterEntry
from server.adapters.formats import (
    AdapterLimits,
    load_adapter_dir,
    load_adapter_files,
    resolve_adapter_path,
    validate_adapter_id,
)
from server.api.errors import InvalidRequestError, error_message, status_for
from server.model.config import ModelArgs

log = logging.getLogger("adapterserve.api")
T = TypeVar("T")


class AdapterOpError(Exception):
    """An adapter operation failed with canonical status ``code``; ``message`` is for the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


async def run_adapter_op(fn: Callable[..., T], *args) -> T:
    """Run an adapter operation (register, unregister, get) in a worker thread, never on the event loop.

    Shared by AdapterService (gRPC) and the HTTP admin endpoints: a known error type becomes
    :class:`AdapterOpError` with its status; anything else is a bug, logged with its traceback and INTERNAL.
    """
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except Exception as e:
        code = status_for(e)
        if code is None:
            log.exception("adapter operation failed")
            code = grpc.StatusCode.INTERNAL
        raise AdapterOpError(code, error_message(e)) from e


def adapter_message(e: AdapterEntry) -> pb.Adapter:
    s = e.spec
    return pb.Adapter(
        adapter_id=e.adapter_id, type=pb.AdapterType.Value(s.kind.value), rank=s.rank,
        num_virtual_tokens=s.num_virtual_tokens, target_modules=s.target_modules, size_bytes=s.size_bytes,
        state=pb.AdapterState.Value(e.state.value), pinned=e.pinned, merged=e.merged, load_ms=e.load_ms,
        base_model=s.base_model, active_requests=max(0, e.refs),
    )


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, manager: AdapterCatalog, model_args: ModelArgs, adapter_root: str, limits: AdapterLimits):
        self.manager = manager
        self.model_args = model_args
        self.adapter_root = adapter_root
        self.limits = limits

    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context):
        return await self._call(context, self.register_blocking, request)

    async def UnregisterAdapter(self, request: pb.UnregisterAdapterRequest, context):
        entry = await self._call(context, self.manager.unregister, request.adapter_id)
        return pb.UnregisterAdapterResponse(adapter_id=entry.adapter_id)

    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[adapter_message(e) for e in self.manager.list()])

    async def GetAdapter(self, request: pb.GetAdapterRequest, context):
        return await self._call(context, lambda: adapter_message(self.manager.get(request.adapter_id)))

    def register_blocking(self, request: pb.RegisterAdapterRequest) -> pb.Adapter:
        """Parse, validate and install. Runs on a worker thread (see `_call`), never on the event loop:
        file reading, header and config checks, pattern matching and the engine round trip all block."""
        validate_adapter_id(request.adapter_id)
        source = request.WhichOneof("source")
        if source == "path":
            folder = resolve_adapter_path(self.adapter_root, request.path)
            spec = load_adapter_dir(folder, self.model_args, self.limits, root=self.adapter_root)
        elif source == "files":
            spec = load_adapter_files(request.files.config_json, request.files.safetensors, self.model_args, self.limits)
        else:
            raise InvalidRequestError("source: give path or files")
        entry = self.manager.register(request.adapter_id, spec, merge=request.merge, pin=request.pin,
                                      replace=request.replace)
        log.info("registered adapter %s (%s, %d bytes) in %.1f ms", entry.adapter_id, spec.kind.value,
                 spec.size_bytes, entry.load_ms)
        return adapter_message(entry)

    async def _call(self, context, fn, *args):
        try:
            return await run_adapter_op(fn, *args)
        except AdapterOpError as e:
            await context.abort(e.code, e.message)

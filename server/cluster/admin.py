"""Adapter admin in the cluster: the adapter store is the registry, every replica's copy a cache of it.

RegisterAdapter (a path under ``--adapter-root`` or inline files) validates the adapter exactly as the
single server does and writes it into the store atomically (:class:`server.adapters.store.AdapterStore`);
UnregisterAdapter removes it from the store. Then, before the call returns, every replica evicts the
id (:meth:`EngineReplica.evict` through ``DeploymentHandle.broadcast``): requests already running finish
on the weights they started with, the next one loads the store's current version, so no replica
serves old weights after a replace or unregister returns. A replica that dies meanwhile comes back
empty; one that cannot confirm in time fails the call UNAVAILABLE (the store is written: retry).

:class:`ClusterAdapterService` takes the place of the single server's AdapterServicer in a replica's
gRPC admin calls and OpenAI admin routes (``register_blocking`` and ``manager.unregister`` are what
both use), so requests, validation and errors stay the single server's.
Thread domain: ``register_blocking`` / ``unregister`` on worker threads (file I/O, the fan-out);
the servicer methods on the replica's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from adapterserve.v1 import adapterserve_pb2 as pb
from server.adapters.catalog import AdapterCatalog, AdapterEntry, AdapterNotFoundError
from server.adapters.store import AdapterStore, StoredAdapter
from server.api.adapters import AdapterServicer, adapter_message
from server.api.errors import InvalidRequestError
from server.engine.engine import EngineUnavailableError

log = logging.getLogger("adapterserve.cluster")

EVICT_TIMEOUT_S = 60.0


class ClusterCatalog:
    """The catalog the admin routes see: reads are this replica's, unregister is cluster-wide."""

    def __init__(self, catalog: AdapterCatalog, unregister: Callable[[str], AdapterEntry]):
        self._catalog = catalog
        self.unregister = unregister

    def get(self, adapter_id: str) -> AdapterEntry:
        return self._catalog.get(adapter_id)

    def list(self) -> list[AdapterEntry]:
        return self._catalog.list()


class ClusterAdapterService(AdapterServicer):
    """AdapterService for the cluster: writes go to the store, then every replica evicts the id."""

    def __init__(self, catalog: AdapterCatalog, store: AdapterStore, evict_everywhere: Callable[[str], None],
                 **servicer_kw):
        super().__init__(catalog, **servicer_kw)
        self.store = store
        self.evict_everywhere = evict_everywhere
        self.manager = ClusterCatalog(catalog, self.unregister)  # type: ignore[assignment]

    def register_blocking(self, request: pb.RegisterAdapterRequest) -> pb.Adapter:
        """Validate, store atomically, evict everywhere (worker thread); the Adapter as stored."""
        if request.merge or request.pin:
            field = "merge" if request.merge else "pin"
            raise InvalidRequestError(f"{field}: not available in the cluster (each replica holds the adapters "
                                      "its traffic needs; merge or pin per replica is not coordinated)")
        source = request.WhichOneof("source")
        if source == "path":
            stored = self.store.write_folder(request.adapter_id, request.path, replace=request.replace)
        elif source == "files":
            stored = self.store.write(request.adapter_id, request.files.config_json, request.files.safetensors,
                                      replace=request.replace)
        else:
            raise InvalidRequestError("source: give path or files")
        self.evict_everywhere(request.adapter_id)
        log.info("stored adapter %s (%s, version %s); every replica evicted it", stored.adapter_id,
                 stored.spec.kind.value, stored.version)
        return _stored_message(stored)

    def unregister(self, adapter_id: str) -> AdapterEntry:
        """Remove from the store, then evict everywhere (worker thread); NOT_FOUND when the store had nothing."""
        if not self.store.remove(adapter_id):
            raise AdapterNotFoundError(f"adapter_id {adapter_id!r} is not registered")
        self.evict_everywhere(adapter_id)
        log.info("removed adapter %s from the store; every replica evicted it", adapter_id)
        return AdapterEntry(adapter_id, None, 0)  # type: ignore[arg-type]  (only adapter_id is read)

    async def UnregisterAdapter(self, request: pb.UnregisterAdapterRequest, context):
        entry = await self._call(context, self.unregister, request.adapter_id)
        return pb.UnregisterAdapterResponse(adapter_id=entry.adapter_id)


def _stored_message(stored: StoredAdapter) -> pb.Adapter:
    """The Adapter message of what the store now holds (state REGISTERED: no replica holds it yet)."""
    return adapter_message(AdapterEntry(stored.adapter_id, stored.spec, 0))


def broadcast_evict(app_name: str, engine: str) -> Callable[[str], None]:
    """A blocking ``evict_everywhere(id)`` for worker threads: every live replica of `engine` drops the id."""
    from ray.exceptions import RayActorError
    from ray.serve import get_deployment_handle

    def evict_everywhere(adapter_id: str) -> None:
        handle = get_deployment_handle(engine, app_name=app_name)
        try:
            results = handle.broadcast("evict", adapter_id).results(timeout_s=EVICT_TIMEOUT_S, return_exceptions=True)
        except TimeoutError:
            raise EngineUnavailableError(f"adapter {adapter_id!r} is written to the adapter store but not every "
                                         f"replica confirmed its eviction within {EVICT_TIMEOUT_S:g} s; "
                                         "retry") from None
        failed = [r for r in results if isinstance(r, Exception) and not isinstance(r, RayActorError)]
        if failed:  # a dead replica comes back empty; a live one that failed may still hold the old weights
            raise EngineUnavailableError(f"adapter {adapter_id!r} is written to the adapter store but "
                                         f"{len(failed)} replica(s) failed to evict it ({failed[0]!r}); retry")

    return evict_everywhere

"""Run the HTTP API with uvicorn on the gRPC server's own asyncio loop.

Where it runs: on the same loop as grpc.aio, because both only relay engine events (the model
runs on the engine thread), one loop receives the engine's event pump, and a second loop thread
would only add GIL hand-offs; bench/http.py measures the two APIs side by side in one run.
Thread domain: the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time

import uvicorn

from server.api.http.app import HttpApp
from server.config import ServerConfig

log = logging.getLogger("adapterserve.http")


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` with the gRPC server's TLS options."""

    def __init__(self, app: HttpApp, cfg: ServerConfig):
        self.cfg = cfg
        self.app = app
        ssl_kw = {}
        if cfg.tls_cert:
            ssl_kw = {"ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key}
            if cfg.tls_client_ca:
                ssl_kw.update(ssl_ca_certs=cfg.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, http="auto",  # httptools when installed
                                     timeout_graceful_shutdown=cfg.grace_seconds, **ssl_kw)
        self.server = uvicorn.Server(self.config)  # serve() is not used: it would take over SIGTERM
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._main: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port. Raises RuntimeError when it cannot bind."""
        cfg = self.cfg
        try:
            family = socket.AF_INET6 if ":" in cfg.http_host else socket.AF_INET
            self._sock = socket.create_server((cfg.http_host, cfg.http_port), family=family, backlog=2048)
        except OSError as e:
            raise RuntimeError(f"cannot listen for HTTP on {cfg.http_host}:{cfg.http_port}: {e}") from e
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self._sock])
        self.port = self._sock.getsockname()[1]
        self._main = asyncio.create_task(self.server.main_loop())
        log.info("HTTP (OpenAI API) listening on %s:%d (%s)", cfg.http_host, self.port,
                 "TLS" if cfg.tls_cert else "plaintext")
        return self.port

    async def stop(self, grace: float) -> None:
        """Close after the server's shutdown phases (``ServerApp.shutdown``: completions were accepted during
        --drain-seconds, then refused 503 by the closed engine): wait up to ``grace`` seconds for responses
        still being sent, then stop listening and close the connections."""
        if self._main is None:
            return
        end = time.monotonic() + grace
        while self.app.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self.config.timeout_graceful_shutdown = max(0.1, end - time.monotonic())
        self.server.should_exit = True
        await self._main
        await self.server.shutdown(sockets=[self._sock] if self._sock else None)
        self._main = None

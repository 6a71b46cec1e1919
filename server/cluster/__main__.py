"""`python -m server.cluster`: run the server as Ray Serve replicas until SIGTERM/SIGINT.

Parses the same flags and ADAPTERSERVE_* variables as ``python -m server`` plus the cluster's own
(``--address``, ``--replicas``, ``--max-adapters-per-replica``, ...; ``--help`` lists them), deploys
(:class:`server.cluster.deploy.Cluster`), then waits in the foreground. On SIGTERM or SIGINT it
stops in the single server's phases (``Cluster.stop``): health NOT_SERVING for ``--drain-seconds``
while requests are still served, then the Serve application is deleted (new requests refused,
in-flight ones get ``--grace-seconds``), then Serve stops, and Ray too when it started it; exit
status 0. A signal during start-up stops what has started so far, also with status 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

log = logging.getLogger("adapterserve.cluster")


def main(argv: list[str] | None = None) -> int:
    from server.cluster.config import parse_cluster_config
    from server.config import ConfigError
    from server.request_log import configure_logging

    try:
        cfg = parse_cluster_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_format, cfg.log_level)
    from server.cluster.deploy import Cluster

    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        if not stop.is_set():
            log.info("%s: shutting the cluster down", signal.Signals(signum).name)
        stop.set()

    def install_handlers() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    install_handlers()
    cluster = Cluster(cfg)
    serving = False
    try:
        cluster.connect()
        install_handlers()  # ray.init replaced SIGTERM's (sys.exit from the handler, an abort at exit)
        if not stop.is_set():
            cluster.deploy(stop=stop)
        if not stop.is_set():
            print(f"adapterserve cluster serving: gRPC :{cfg.port}, HTTP {cfg.http_host}:{cfg.http_port}, "
                  f"Ray {cluster.ray_address}", flush=True)
            serving = True
        # A timed wait: the main thread returns to the interpreter every second, so the SIGTERM handler
        # runs even when the kernel delivered the signal to one of Ray's threads (an untimed wait
        # would not wake: a cluster under bench.cluster once kept serving 120 s after SIGTERM).
        while not stop.wait(1.0):
            pass
    finally:
        cluster.stop(drain_s=cfg.drain_seconds if serving else 0.0)
    log.info("cluster stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

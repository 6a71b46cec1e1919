"""`python -m server.cluster`: run the server as Ray Serve replicas until SIGTERM/SIGINT.

Parses the same flags and ADAPTERSERVE_* variables as ``python -m server`` plus the cluster's own
(``--address``, ``--replicas``, ``--max-adapters-per-replica``, ...; ``--help`` lists them), deploys
(:class:`server.cluster.deploy.Cluster`), then waits in the foreground. On SIGTERM or SIGINT it
deletes the Serve application (each replica drains: health NOT_SERVING, in-flight requests get
``--grace-seconds``), shuts Serve down, and Ray too when it started it; exit status 0.
"""

from __future__ import annotations

import signal
import sys
import threading


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
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(cfg)
    try:
        cluster.start()
        print(f"adapterserve cluster serving: gRPC :{cfg.port}, HTTP {cfg.http_host}:{cfg.http_port}", flush=True)
        stop.wait()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m server`: parse flags and ADAPTERSERVE_* variables, then serve until SIGTERM."""

from __future__ import annotations

import sys

# OpenMP's default (spin ~300k iterations, then sleep) measured best for the server on an idle
# 2-core machine: PASSIVE (never spin) made each small LoRA op pay a thread wake-up (2.5x slower
# bmm), ACTIVE (always spin) starved the gRPC threads. Set OMP_WAIT_POLICY or GOMP_SPINCOUNT to
# override, e.g. PASSIVE on a machine shared with other CPU-heavy work.


def main(argv: list[str] | None = None) -> int:
    from server.config import ConfigError, parse_config
    from server.model.config import UnsupportedModelError
    from server.request_log import configure_logging

    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_format, cfg.log_level)
    from server.app import serve

    try:
        return serve(cfg)
    except (UnsupportedModelError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Logging setup for the ``adapterserve`` logger tree, and one structured line per finished request.

``configure_logging("json")`` writes one JSON object per line::

    {"ts": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "adapterserve.requests",
     "msg": "request finished", "request_id": "r1", "adapter": "a1", "status": "OK", ...}

``configure_logging("text")`` writes ``<ts> <LEVEL> <logger> <msg> key=value ...``. In both
formats, fields passed through ``logging``'s ``extra=`` become top-level keys / ``key=value``
pairs, so any module under ``adapterserve.*`` can log structured fields the same way.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import IO, Any

ROOT_LOGGER = "adapterserve"
REQUEST_LOGGER = "adapterserve.requests"
FORMATS = ("text", "json")
_SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _timestamp(record: logging.LogRecord) -> str:
    dt = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's extra fields, exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        """Return ``record`` as a single-line JSON object."""
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extra_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> <msg> key=value ...``; values with spaces are JSON-quoted."""

    def format(self, record: logging.LogRecord) -> str:
        """Return ``record`` as one human-readable line (plus a traceback when there is one)."""
        parts = [_timestamp(record), record.levelname, record.name, record.getMessage()]
        for key, value in _extra_fields(record).items():
            text = "-" if value is None else str(value)
            if not text or any(c.isspace() or c in '"=' for c in text):
                text = json.dumps(text, ensure_ascii=False)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class _OwnHandler(logging.StreamHandler):
    """Marker type: the handler :func:`configure_logging` installed (replaced on reconfigure)."""


def configure_logging(
    fmt: str = "text", level: str = "INFO", stream: IO[str] | None = None
) -> logging.Logger:
    """Send the ``adapterserve`` logger tree to ``stream`` (default stderr) in ``fmt`` at ``level``.

    Idempotent: calling it again replaces the handler it installed before, never adds a second.
    The tree stops propagating to the root logger so lines are not printed twice.
    Returns the ``adapterserve`` logger.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _OwnHandler):
            logger.removeHandler(handler)
            handler.close()
    handler = _OwnHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = False
    return logger


def _ms(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def log_request(
    request_id: str,
    adapter_id: str,
    status: Any,
    prompt_tokens: int,
    completion_tokens: int,
    queue_ms: float | None,
    ttft_ms: float | None,
    total_ms: float,
    **extra: Any,
) -> None:
    """Emit ONE ``request finished`` line on ``adapterserve.requests`` for a finished request.

    Fields: request_id, adapter (``_base`` for the base model; the full id otherwise -- logs have
    no cardinality bound), status (gRPC code name; a ``grpc.StatusCode`` is accepted),
    prompt_tokens, completion_tokens, queue_ms, ttft_ms, total_ms (None = not reached), plus
    ``extra`` (e.g. ``finish_reason=``, ``error=``). An extra key that clashes with a LogRecord
    attribute is written as ``extra_<key>``. Logged at INFO, or WARNING for server-side faults
    (INTERNAL, UNKNOWN, DATA_LOSS); client errors and cancellations are ordinary traffic.
    """
    code = getattr(status, "name", status)
    code = str(code).upper()
    fields: dict[str, Any] = {
        "request_id": request_id,
        "adapter": adapter_id or "_base",
        "status": code,
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "queue_ms": _ms(queue_ms),
        "ttft_ms": _ms(ttft_ms),
        "total_ms": _ms(total_ms),
    }
    for key, value in extra.items():
        fields[f"extra_{key}" if key in _RECORD_ATTRS or key in fields else key] = value
    level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
    logging.getLogger(REQUEST_LOGGER).log(level, "request finished", extra=fields)

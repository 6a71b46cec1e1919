"""Errors raised while reading an adapter; both map to gRPC INVALID_ARGUMENT."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """The adapter files are malformed or use a feature this server does not implement.

    The message names the offending field, feature or limit (e.g. ``use_dora``, ``max_lora_rank``).
    """


class AdapterPathError(ValueError):
    """An adapter path is absolute, climbs out of the adapter root, or names no folder."""

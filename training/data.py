"""Training data: validation with file:line reports, then conversion to TRL's dataset formats.

Every command validates its whole file before any model is loaded. Problems are collected
(not just the first) and reported as ``FILE:LINE: what is wrong``; the CLI exits with code 2.

Formats (one JSON object per line; blank lines are skipped):

- SFT: ``{"messages": [{"role", "content"}, ...]}`` (the last message is the assistant reply
  trained on) or ``{"prompt": str, "completion": str}``.
- CPT: raw text ``.txt`` (documents separated by blank lines) or ``.jsonl`` ``{"text": str}``.
- Preferences (reward, dpo): ``{"prompt": str, "chosen": str, "rejected": str}``.
- Prompts (grpo, rloo): ``{"prompt": str}``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 50


class DataError(Exception):
    """The data file has problems; ``problems`` holds one ``FILE:LINE: reason`` string each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more else "")
        super().__init__(text)


class _Invalid(Exception):
    """One line's problem (internal)."""


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each line; text is None when the line is not valid UTF-8."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError([f"{path}: no such file"])
    if not p.is_file():
        raise DataError([f"{path}: not a file"])
    return p


def _string(obj: dict, key: str) -> str:
    if key not in obj:
        raise _Invalid(f'missing "{key}"')
    value = obj[key]
    if not isinstance(value, str):
        raise _Invalid(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise _Invalid(f'"{key}" is empty')
    return value


def read_jsonl(path: str | Path, parse: Callable[[dict], Any]) -> list[Any]:
    """Parse every non-blank line with ``parse(obj)``; raise DataError listing every bad line."""
    p = _check_file(path)
    rows, problems = [], []
    for number, text in _lines(p):
        where = f"{path}:{number}"
        if text is None:
            problems.append(f"{where}: not valid UTF-8")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        try:
            rows.append(parse(obj))
        except _Invalid as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError([f"{path}: no examples (the file is empty)"])
    return rows


# ---------------------------------------------------------------- per-format parsers


def _messages(obj: dict) -> list[dict[str, str]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _Invalid('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _Invalid(f"messages[{i}] must be an object, got {type(m).__name__}")
        if "role" not in m:
            raise _Invalid(f'messages[{i}]: missing "role"')
        if m["role"] not in ROLES:
            raise _Invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if "content" not in m:
            raise _Invalid(f'messages[{i}]: missing "content"')
        if not isinstance(m["content"], str):
            raise _Invalid(f'messages[{i}].content must be a string, got {type(m["content"]).__name__}')
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise _Invalid("the last message must be the assistant's (it is the reply trained on)")
    if not out[-1]["content"].strip():
        raise _Invalid("the last (assistant) message is empty")
    if len(out) < 2:
        raise _Invalid("needs at least one message before the assistant reply")
    return out


def parse_sft(obj: dict) -> dict[str, Any]:
    """One SFT example as ``{"messages": [...]}`` or ``{"prompt": str, "completion": str}``."""
    if "messages" in obj:
        return {"messages": _messages(obj)}
    if "prompt" not in obj and "completion" not in obj:
        raise _Invalid('needs "messages", or "prompt" and "completion"')
    return {"prompt": _string(obj, "prompt"), "completion": _string(obj, "completion")}


def parse_text(obj: dict) -> str:
    """One CPT document ``{"text": str}``."""
    return _string(obj, "text")


def parse_preference(obj: dict) -> dict[str, str]:
    """One preference pair ``{"prompt", "chosen", "rejected"}``."""
    row = {k: _string(obj, k) for k in ("prompt", "chosen", "rejected")}
    if row["chosen"] == row["rejected"]:
        raise _Invalid('"chosen" and "rejected" are identical')
    return row


def parse_prompt(obj: dict) -> dict[str, str]:
    """One RL prompt ``{"prompt": str}``."""
    return {"prompt": _string(obj, "prompt")}


# ---------------------------------------------------------------- readers (validate the whole file)


def read_sft(path: str | Path) -> list[dict[str, Any]]:
    """Validated SFT examples (``messages`` or ``prompt``/``completion`` rows)."""
    return read_jsonl(path, parse_sft)


def read_preferences(path: str | Path) -> list[dict[str, str]]:
    """Validated preference pairs."""
    return read_jsonl(path, parse_preference)


def read_prompts(path: str | Path) -> list[dict[str, str]]:
    """Validated RL prompts."""
    return read_jsonl(path, parse_prompt)


def read_text(path: str | Path) -> list[dict[str, str]]:
    """CPT documents as ``{"text": str}`` rows from a .txt (blank-line separated) or .jsonl file."""
    p = _check_file(path)
    if p.suffix == ".jsonl":
        return [{"text": t} for t in read_jsonl(path, parse_text)]
    if p.suffix not in (".txt", ".md", ".text"):
        raise DataError([f"{path}: expected a .txt (raw text) or .jsonl ({{\"text\": ...}}) file"])
    docs, current, problems = [], [], []
    for number, text in _lines(p):
        if text is None:
            problems.append(f"{path}:{number}: not valid UTF-8")
            continue
        if text.strip():
            current.append(text.rstrip("\n"))
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    if problems:
        raise DataError(problems)
    if not docs:
        raise DataError([f"{path}: no text (the file is empty)"])
    return [{"text": d} for d in docs]


# ---------------------------------------------------------------- converters (validated rows -> TRL rows)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_to_trl(rows: list[dict[str, Any]], chat: bool, path: str | Path = "data") -> list[dict[str, Any]]:
    """SFT rows in TRL's prompt-completion form (conversational when ``chat``).

    A ``messages`` example becomes prompt = all messages but the last, completion = the last
    (assistant) message, so with completion-only loss the loss falls on that reply only.
    """
    out = []
    for row in rows:
        if "messages" in row:
            if not chat:
                raise DataError([f"{path}: chat-format examples need the tokenizer's chat template "
                                 "(the tokenizer has none, or --no-chat-template was given)"])
            out.append({"prompt": row["messages"][:-1], "completion": row["messages"][-1:]})
        elif chat:
            out.append({"prompt": _user(row["prompt"]), "completion": _assistant(row["completion"])})
        else:
            out.append(dict(row))
    return out


def preferences_to_trl(rows: list[dict[str, str]], chat: bool) -> list[dict[str, Any]]:
    """Preference rows with an explicit prompt (conversational when ``chat``)."""
    if not chat:
        return [dict(r) for r in rows]
    return [{"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]), "rejected": _assistant(r["rejected"])}
            for r in rows]


def prompts_to_trl(rows: list[dict[str, str]], chat: bool) -> list[dict[str, Any]]:
    """RL prompt rows (conversational when ``chat``)."""
    return [{"prompt": _user(r["prompt"])} for r in rows] if chat else [dict(r) for r in rows]


def holdout_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic (train, held-out) split with at least one example on each side."""
    if not 0.0 < fraction < 1.0:
        raise DataError([f"--eval-fraction must be in (0, 1), got {fraction}"])
    if len(rows) < 2:
        raise DataError([f"need at least 2 preference pairs for a held-out split, got {len(rows)}"])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return [rows[i] for i in kept], [rows[i] for i in held]

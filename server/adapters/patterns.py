"""Module-name patterns from adapter configs, matched as PEFT does but bounded in time and size.

PEFT picks a module's rank / alpha with ``get_pattern_key``: the first key of ``rank_pattern`` /
``alpha_pattern`` for which ``re.match(rf"(.*\\.)?({key})$", module_path)`` matches. A key is a
client-supplied regular expression, and Python's ``re`` backtracks without limit while holding
the GIL: one pathological ``rank_pattern`` made a registration take 48 s and froze every stream
(``(.*?)*(.*?)*(.*?)*\\.[a-z]_`` ran past 10 s on one module name here).

Here the same expressions are compiled with the ``regex`` module (its default VERSION0 syntax is
``re``'s) and matched with a time budget shared by the whole adapter (:data:`MATCH_BUDGET_S`) and
``concurrent=True``, which releases the GIL while matching, so the engine thread keeps stepping.
Compiling is bounded by size instead: at most :data:`MAX_PATTERN_CHARS` characters, and the
product of every counted repetition ``{m,n}`` in a key at most :data:`MAX_REPEAT_PRODUCT` (a nested
``(?:a{65535}){65535}`` otherwise exhausts memory inside the compiler), at most
:data:`MAX_PATTERN_KEYS` keys, and keys that are plain module names (word characters and dots,
the common case for long mappings) are matched by string comparison with the same result as the
regex, never compiled (compiling 1024 keys took 1.2 s of CPU). A key that breaks a bound
raises AdapterFormatError naming the config field: INVALID_ARGUMENT to the client.

Thread: any (registration runs on a worker thread, never on the event loop or the engine thread).
"""

from __future__ import annotations

import re
import time

import regex

from server.adapters.errors import AdapterFormatError

MAX_PATTERN_CHARS = 256
MAX_PATTERN_KEYS = 1024  # per field: a 1 MiB config could otherwise hold 50 000 keys to compile
MAX_REPEAT_PRODUCT = 256
MATCH_BUDGET_S = 0.5  # all matches of one config field, for one adapter

_COUNTED_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_PLAIN = re.compile(r"[\w.]+", re.ASCII)  # module-name keys: matched without a compiled regex


def shown(value: object, limit: int = 60) -> str:
    """A short repr of a client-supplied value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class TargetModules:
    """PEFT's ``check_target_module_exists`` for ``target_modules``-like fields (IA3's
    ``feedforward_modules`` too): a string is a regex the module path must fully match, a list holds
    names the path must equal or end with (after a dot). Bounded as :class:`PatternTable`."""

    def __init__(self, field: str, target: str | list[str] | None, budget_s: float | None = None):
        self.field = field
        self.names: list[str] = [] if isinstance(target, str) or target is None else list(target)
        self._table: PatternTable | None = None
        if isinstance(target, str):
            self._table = PatternTable(field, [target], budget_s, full=True)

    def matches(self, module_path: str) -> bool:
        if self._table is not None:
            return self._table.first(module_path) is not None
        return any(module_path == n or module_path.endswith("." + n) for n in self.names)


class PatternTable:
    """The keys of one ``*_pattern`` mapping, compiled once; :meth:`first` is PEFT's ``get_pattern_key``."""

    def __init__(self, field: str, keys: list[str], budget_s: float | None = None, full: bool = False):
        """`full`: each key must match the whole path (re.fullmatch) instead of get_pattern_key's suffix rule."""
        self.field = field
        self.budget_s = MATCH_BUDGET_S if budget_s is None else budget_s
        self._spent = 0.0
        if len(keys) > MAX_PATTERN_KEYS:
            raise AdapterFormatError(f"{field}: {len(keys)} patterns, at most {MAX_PATTERN_KEYS}")
        self._compiled = [(key, _PlainKey(key) if not full and _PLAIN.fullmatch(_checked(field, key))
                           else _compile(field, _checked(field, key), full)) for key in keys]

    def first(self, module_path: str) -> str | None:
        """The first key matching `module_path`, or None; AdapterFormatError once the budget is spent."""
        for key, pattern in self._compiled:
            left = self.budget_s - self._spent
            t0 = time.perf_counter()
            try:
                if left <= 0:
                    raise TimeoutError
                hit = pattern.match(module_path, timeout=left, concurrent=True)
            except TimeoutError:
                raise AdapterFormatError(
                    f"{self.field}: pattern {shown(key)} takes more than {self.budget_s:g} s to match module "
                    f"names (catastrophic backtracking); simplify it") from None
            finally:
                self._spent += time.perf_counter() - t0
            if hit:
                return key
        return None


class _PlainKey:
    r"""A key of word characters and dots, matched as ``(.*\.)?(key)$`` would without compiling it:
    the path's last len(key) characters equal the key's, each ``.`` of the key matching any one
    character, and what precedes them is empty or ends with a dot."""

    def __init__(self, key: str):
        self.key = key

    def match(self, path: str, timeout: float, concurrent: bool) -> bool:
        n = len(self.key)
        if len(path) < n or (len(path) > n and path[-n - 1] != "."):
            return False
        return all(k == "." or k == c for k, c in zip(self.key, path[-n:], strict=True))


def _checked(field: str, key: object) -> str:
    if not isinstance(key, str) or not key:
        raise AdapterFormatError(f"{field}: keys must be non-empty module name patterns, got {shown(key)}")
    if len(key) > MAX_PATTERN_CHARS:
        raise AdapterFormatError(f"{field}: pattern {shown(key)} is longer than {MAX_PATTERN_CHARS} characters")
    return key


def _compile(field: str, key: str, full: bool = False) -> regex.Pattern:
    r"""``(.*\.)?(key)$`` (get_pattern_key), or with `full` the key itself, anchored at both ends (fullmatch)."""
    product = 1
    for m in _COUNTED_REPEAT.finditer(key):
        bounds = [int(b) for b in m.groups() if b]
        product *= max([1, *bounds])
        if product > MAX_REPEAT_PRODUCT:
            raise AdapterFormatError(
                f"{field}: pattern {shown(key)} repeats too much (counted repetitions multiply to more than "
                f"{MAX_REPEAT_PRODUCT})")
    try:
        if full:
            regex.compile(key, flags=regex.VERSION0)  # alone first: "a)|(b" must fail as re.fullmatch fails
            return regex.compile(rf"(?:{key})\Z", flags=regex.VERSION0)
        return regex.compile(rf"(.*\.)?({key})$", flags=regex.VERSION0)
    except (regex.error, OverflowError, RecursionError, ValueError) as e:
        raise AdapterFormatError(f"{field} has an invalid pattern {shown(key)}: {getattr(e, 'msg', e)}") from None

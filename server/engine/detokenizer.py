"""Incremental detokenization and stop strings: new token ids -> the text a stream may send now.

Text is appended only when it is complete (an incomplete UTF-8 sequence waits for the next token),
cut at the first stop string, and held back while its tail could still grow into a stop string.

Thread domain: engine thread only (it updates the request's text state).
"""

from __future__ import annotations

from server.engine.request import FinishReason, Request
from server.model.tokenizer import Tokenizer


def finish_reason(r: Request, token: int, tokenizer: Tokenizer) -> FinishReason | None:
    """Append `token` (already in r.output_ids) to r.text; return why the request ends now, if it does."""
    may_stop = len(r.output_ids) >= r.sampling.min_new_tokens  # before that, EOS and stop strings don't end it
    eos = token in tokenizer.eos_token_ids and not r.sampling.ignore_eos and may_stop
    reason = FinishReason.EOS if eos else None
    reason = _detokenize(r, tokenizer, may_stop) or reason
    if reason is None and len(r.output_ids) >= r.sampling.max_new_tokens:
        reason = FinishReason.LENGTH
    return reason


def take_text(r: Request, finished: bool) -> str:
    """Text not sent yet that no stop string can still claim (all of it when the request ends)."""
    end = len(r.text) if finished else len(r.text) - _held_back(r.text, r.sampling.stop)
    text, r.sent_chars = r.text[r.sent_chars:end], max(r.sent_chars, end)
    return text


def _detokenize(r: Request, tokenizer: Tokenizer, check_stops: bool = True) -> FinishReason | None:
    """Append newly complete text to r.text; cut at a stop string and return STOP if one matched
    (only with `check_stops`: text generated before min_new_tokens is never searched)."""
    ids = r.output_ids
    prefix_text = tokenizer.decode(ids[r.prefix_offset:r.read_offset])
    new_text = tokenizer.decode(ids[r.prefix_offset:])
    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
        return None  # an incomplete UTF-8 sequence: wait for the next token
    old_len = len(r.text)
    r.text += new_text[len(prefix_text):]
    r.prefix_offset, r.read_offset = r.read_offset, len(ids)
    for s in r.sampling.stop if check_stops else ():
        pos = r.text.find(s, max(0, old_len - len(s) + 1))
        if pos >= 0:
            r.text = r.text[:pos]
            return FinishReason.STOP
    return None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if s.startswith(text[-n:]):
                held = n
                break
    return held

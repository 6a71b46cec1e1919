"""Malformed data is reported as FILE:LINE: reason, every bad line, before any model is loaded (exit 2)."""

from __future__ import annotations

import pytest

from tests.training.conftest import run_cli, write_jsonl
from training.data import DataError, holdout_split, read_sft, read_text

GOOD_SFT = '{"prompt": "hi", "completion": "ANSWER: hi"}'
GOOD_PREF = '{"prompt": "p", "chosen": "ANSWER: 1", "rejected": "dunno"}'


@pytest.mark.parametrize("command, good, bad, reason", [
    ("sft", GOOD_SFT, '{"prompt": "hi"}', 'missing "completion"'),
    ("sft", GOOD_SFT, '{"prompt": "hi", "completion": 3}', '"completion" must be a string, got int'),
    ("sft", GOOD_SFT, '{"prompt": "  ", "completion": "x"}', '"prompt" is empty'),
    ("sft", GOOD_SFT, '{"prompt": "hi", "completion": "x"', "invalid JSON: Expecting ',' delimiter"),
    ("sft", GOOD_SFT, '["prompt", "completion"]', "expected a JSON object, got list"),
    ("sft", GOOD_SFT, '{"text": "hello"}', 'needs "messages", or "prompt" and "completion"'),
    ("sft", GOOD_SFT, '{"messages": []}', '"messages" must be a non-empty list'),
    ("sft", GOOD_SFT, '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
     "messages[1].role must be one of system, user, assistant, got 'bot'"),
    ("sft", GOOD_SFT, '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}',
     'messages[1]: missing "content"'),
    ("sft", GOOD_SFT, '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     "the last message must be the assistant's"),
    ("reward", GOOD_PREF, '{"prompt": "p", "chosen": "a"}', 'missing "rejected"'),
    ("dpo", GOOD_PREF, '{"prompt": "p", "chosen": "a", "rejected": "a"}', '"chosen" and "rejected" are identical'),
    ("grpo", '{"prompt": "p"}', '{"question": "p"}', 'missing "prompt"'),
    ("cpt", '{"text": "some text"}', '{"text": ""}', '"text" is empty'),
])
def test_bad_line_reported_with_file_and_line(tmp_path, capsys, command, good, bad, reason):
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, "", good, good, good, bad, good])
    extra = ["--reward-model", tmp_path] if command == "grpo" else []
    # A model path that does not exist: the data must be rejected before any model work.
    code = run_cli(command, "--data", data, "--output", tmp_path / "out", "--model", tmp_path / "no-model", *extra)
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:7: {reason}" in err, err
    assert not (tmp_path / "out").exists()


def test_every_bad_line_is_listed(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT, "{", GOOD_SFT, '{"prompt": "x"}', "nope"])
    with pytest.raises(DataError) as e:
        read_sft(data)
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{data}:2", f"{data}:4", f"{data}:5"]


def test_not_utf8_and_empty_and_missing(tmp_path):
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(GOOD_SFT.encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(DataError, match=r"bin.jsonl:2: not valid UTF-8"):
        read_sft(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_sft(empty)
    with pytest.raises(DataError, match="no such file"):
        read_sft(tmp_path / "missing.jsonl")


def test_text_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert read_text(path) == [{"text": "first doc\nline two"}, {"text": "second doc"}]
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="expected a .txt"):
        read_text(csv)


def test_holdout_split_is_deterministic_and_nonempty():
    rows = list(range(10))
    train, held = holdout_split(rows, 0.2, seed=1)
    assert (train, held) == holdout_split(rows, 0.2, seed=1)
    assert len(held) == 2 and sorted(train + held) == rows
    assert len(holdout_split(rows[:2], 0.01, seed=0)[1]) == 1

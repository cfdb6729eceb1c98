"""No input may escape decoding: every file and message, however hostile, becomes valid chunks
and dead letters, never an exception that would stop the job (hypothesis fuzzes each decoder).
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.ingest.dead_letter import REASONS, DeadLetter
from pipeline.ingest.decode import (
    SUPPORTED_SUFFIXES,
    KeyedChunk,
    _DecodeRecordsFn,
    decode_file,
)

D = 3
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces hostile text is made of: deep nesting, numbers beyond float32 and float64, keys
# that are not keys, NUL bytes, broken escapes, separators in odd places.
FRAGMENTS = [
    "[", "]", "{", "}", ",", ":", "\n", "\r\n", " ", '"', "\\", "\0", "\ufeff", "\u2028",
    "0", "1", "0.5", "-0", "1e999", "-1e39", "nan", "NaN", "inf", "Infinity", "1e-400",
    '"x"', '"key"', '"k\\n"', '"../etc"', "true", "null", "[1,[2]]", "[" * 2000, "]" * 2000,
    '{"x": [0, 1, 0], "key": "k"}', "[0,1,0]", "0,1,0", "a,b,c",
]  # fmt: skip


def _check(items: list) -> None:
    """What decoding may yield: chunks fit for a Bernoulli model of D inputs, dead letters."""
    for item in items:
        if isinstance(item, DeadLetter):
            assert item.reason in REASONS
            continue
        assert isinstance(item, KeyedChunk)
        assert item.rows.dtype == np.float32 and item.rows.ndim == 2 and item.rows.shape[1] == D
        assert len(item.rows) >= 1 and np.isfinite(item.rows).all()
        assert ((item.rows >= 0) & (item.rows <= 1)).all()
        assert item.positions is None or len(item.positions) == len(item.rows)


hostile_text = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)


@FUZZ
@given(suffix=st.sampled_from([*SUPPORTED_SUFFIXES, ".gz", ""]), data=st.binary(max_size=2000))
def test_any_bytes_under_any_suffix(suffix: str, data: bytes) -> None:
    _check(list(decode_file(f"in/f{suffix}", data, D, "bernoulli", "default")))


@FUZZ
@given(suffix=st.sampled_from([".csv", ".jsonl"]), text=hostile_text)
def test_hostile_text(suffix: str, text: str) -> None:
    _check(list(decode_file(f"in/f{suffix}", text.encode("utf-8"), D, "bernoulli", "default")))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@FUZZ
@given(
    rows=st.integers(0, 5),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    archive=st.booleans(),
)
def test_damaged_numpy_files(rows: int, flips: list[tuple[int, int]], archive: bool) -> None:
    data = bytearray(_npy(np.random.default_rng(rows).random((rows, D))))
    if archive:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
            zipped.writestr("x.npy", bytes(data))
        data = bytearray(buffer.getvalue())
    for offset, value in flips:
        data[offset % len(data)] = value
    suffix = ".npz" if archive else ".npy"
    _check(list(decode_file(f"in/f{suffix}", bytes(data), D, "bernoulli", "default")))


@FUZZ
@given(
    messages=st.lists(
        st.one_of(
            hostile_text.map(str.encode),
            st.binary(max_size=200),
            st.tuples(st.one_of(st.none(), st.binary(max_size=20)), hostile_text.map(str.encode)),
        ),
        max_size=20,
    )
)
def test_hostile_messages(messages: list) -> None:
    decoder = _DecodeRecordsFn(D, "bernoulli", "default", "kafka:test")
    _check(decoder._decode(messages))


def test_a_deeply_nested_line_is_one_dead_letter_and_the_rest_trains() -> None:
    # 10,000 "[" made json.loads raise RecursionError, which stopped the job on every restart.
    data = f"[0,1,0]\n{'[' * 10_000}\n[1,1,0]\n".encode()
    items = list(decode_file("in/f.jsonl", data, D, "bernoulli", "default"))
    letters = [item for item in items if isinstance(item, DeadLetter)]
    chunks = [item for item in items if isinstance(item, KeyedChunk)]
    assert [(letter.reason, letter.position) for letter in letters] == [("non_numeric", 2)]
    assert np.concatenate([c.rows for c in chunks]).tolist() == [[0, 1, 0], [1, 1, 0]]
    assert [p for c in chunks for p in c.positions.tolist()] == [1, 3]


def test_a_deeply_nested_message_is_one_dead_letter() -> None:
    decoder = _DecodeRecordsFn(D, "bernoulli", "default", "kafka:test")
    items = decoder._decode([b"[0,1,0]", b"[" * 10_000, json.dumps([1, 1, 0]).encode()])
    letters = [item for item in items if isinstance(item, DeadLetter)]
    rows = np.concatenate([item.rows for item in items if isinstance(item, KeyedChunk)])
    assert [letter.reason for letter in letters] == ["non_numeric"]
    assert sorted(rows.tolist()) == [[0, 1, 0], [1, 1, 0]]

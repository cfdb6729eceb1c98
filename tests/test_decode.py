"""Tests for decoding, validation and dead letters (pipeline.ingest, pipeline.outputs)."""

import io
import json
import pathlib
import pickle
import zipfile

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.ingest.dead_letter import DEAD_LETTER_TAG, EXCERPT_CHARS, DeadLetter
from pipeline.ingest.decode import (
    CHUNK_ROWS,
    DecodeFiles,
    DecodeRecords,
    KeyedChunk,
    ValidateChunks,
    decode_file,
)
from pipeline.ingest.keys import validate_model_key
from pipeline.ingest.validation import validate_rows
from pipeline.outputs.dead_letters import WriteDeadLetters

D = 4


def _options(streaming: bool = False) -> PipelineOptions:
    return PipelineOptions(["--runner=FnApiRunner", *(["--streaming"] if streaming else [])])


def _decode(name: str, data: bytes, likelihood: str = "bernoulli", input_dim: int = D):
    """(chunks as [(key, array)], dead letters) of one file."""
    chunks, letters = [], []
    for item in decode_file(name, data, input_dim, likelihood, "default"):
        if isinstance(item, DeadLetter):
            letters.append(item)
        else:
            assert isinstance(item, KeyedChunk) and item.source == name
            key, chunk = item.key, item.rows
            assert chunk.dtype == np.float32 and chunk.flags.c_contiguous
            assert chunk.ndim == 2 and chunk.shape[1] == input_dim and len(chunk) >= 1
            chunks.append((key, chunk))
    return chunks, letters


def _rows(chunks, key: str = "default") -> np.ndarray:
    selected = [chunk for k, chunk in chunks if k == key]
    return np.concatenate(selected) if selected else np.empty((0, D), np.float32)


def _npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _rng_rows(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d)).astype(np.float32)


def _tfrecord_bytes(tmp_path: pathlib.Path, rows, keys=None) -> bytes:
    import tensorflow as tf

    path = tmp_path / "records.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, row in enumerate(rows):
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=row))}
            if keys is not None and keys[i] is not None:
                feature["key"] = tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[keys[i].encode()])
                )
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    return path.read_bytes()


class _Marker:
    """Unpickling this object creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


# --- Formats round-trip ---------------------------------------------------------------------


def test_npy_round_trips_in_chunks_of_at_most_chunk_rows() -> None:
    rows = _rng_rows(2 * CHUNK_ROWS + 500)
    chunks, letters = _decode("a.npy", _npy_bytes(rows))
    assert letters == []
    assert [len(c) for _, c in chunks] == [CHUNK_ROWS, CHUNK_ROWS, 500]
    np.testing.assert_array_equal(_rows(chunks), rows)


def test_npy_accepts_one_row_integers_and_image_shaped_arrays() -> None:
    chunks, _ = _decode("one.npy", _npy_bytes(np.array([0, 1, 1, 0], dtype=np.uint8)))
    np.testing.assert_array_equal(_rows(chunks), [[0, 1, 1, 0]])
    images = _rng_rows(3, 4).reshape(3, 2, 2)
    chunks, _ = _decode("images.npy", _npy_bytes(images))
    np.testing.assert_array_equal(_rows(chunks), images.reshape(3, 4))


def test_npz_reads_every_array_in_sorted_name_order() -> None:
    first, second = _rng_rows(2, seed=1), _rng_rows(3, seed=2)
    buffer = io.BytesIO()
    np.savez(buffer, b=second, a=first)
    chunks, letters = _decode("x.npz", buffer.getvalue())
    assert letters == []
    np.testing.assert_array_equal(_rows(chunks), np.concatenate([first, second]))


@pytest.mark.parametrize("header", ["", "p0,p1,p2,p3\n"])
def test_csv_round_trips_with_or_without_header(header: str) -> None:
    rows = _rng_rows(5)
    body = "\n".join(",".join(repr(float(v)) for v in row) for row in rows)
    chunks, letters = _decode("a.csv", (header + body + "\n\n").encode())
    assert letters == []
    np.testing.assert_array_equal(_rows(chunks), rows)


def test_jsonl_groups_rows_by_key() -> None:
    lines = [
        json.dumps([0.1, 0.2, 0.3, 0.4]),
        json.dumps({"x": [0.5, 0.5, 0.5, 0.5], "key": "b"}),
        json.dumps({"x": [1, 0, 1, 0]}),
        "",
        json.dumps({"x": [0.0, 0.0, 0.0, 0.0], "key": "b"}),
    ]
    chunks, letters = _decode("a.jsonl", "\n".join(lines).encode())
    assert letters == []
    assert sorted({key for key, _ in chunks}) == ["b", "default"]
    np.testing.assert_allclose(_rows(chunks), [[0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0]])
    np.testing.assert_allclose(_rows(chunks, "b"), [[0.5] * 4, [0.0] * 4])


def test_tfrecord_round_trips_and_groups_by_key(tmp_path: pathlib.Path) -> None:
    rows = _rng_rows(5)
    keys = [None, "k", None, "k", "j"]
    chunks, letters = _decode("a.tfrecord", _tfrecord_bytes(tmp_path, rows, keys))
    assert letters == []
    np.testing.assert_array_equal(_rows(chunks), rows[[0, 2]])
    np.testing.assert_array_equal(_rows(chunks, "k"), rows[[1, 3]])
    np.testing.assert_array_equal(_rows(chunks, "j"), rows[[4]])


# --- Bad rows -------------------------------------------------------------------------------


def test_wrong_width_row_in_csv_is_rejected_and_the_rest_trains() -> None:
    data = b"0.1,0.2,0.3,0.4\n0.5,0.6,0.7\n0.9,0.9,0.9,0.9\n"
    chunks, letters = _decode("a.csv", data)
    np.testing.assert_allclose(_rows(chunks), [[0.1, 0.2, 0.3, 0.4], [0.9] * 4])
    (letter,) = letters
    assert (letter.source, letter.reason, letter.position) == ("a.csv", "wrong_width", 2)
    assert letter.detail == "row has 3 values, expected 4"
    assert letter.record == "line 2: 0.5,0.6,0.7"


def test_a_consistently_wrong_width_array_rejects_every_row() -> None:
    chunks, letters = _decode("a.npy", _npy_bytes(_rng_rows(3, d=5)))
    assert chunks == []
    assert [(x.reason, x.position) for x in letters] == [("wrong_width", i) for i in range(3)]
    assert all(x.detail == "row has 5 values, expected 4" for x in letters)


def test_non_numeric_csv_cell_rejects_only_its_line() -> None:
    data = b"0.1,0.2,0.3,0.4\n0.5,abc,0.7,0.8\n1,1,1,1\n"
    chunks, letters = _decode("a.csv", data)
    np.testing.assert_allclose(_rows(chunks), [[0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1]])
    (letter,) = letters
    assert (letter.reason, letter.position) == ("non_numeric", 2)
    assert "'abc'" in letter.detail and letter.record == "line 2: 0.5,abc,0.7,0.8"


def test_bad_json_lines_are_rejected_one_by_one() -> None:
    lines = ["[0, 0, 0, 0]", "{not json", '{"x": "text"}', '["a", "b", "c", "d"]', "[1, 1]"]
    chunks, letters = _decode("a.jsonl", "\n".join(lines).encode())
    np.testing.assert_array_equal(_rows(chunks), [[0, 0, 0, 0]])
    reasons = [(x.reason, x.position) for x in letters]
    assert reasons == [
        ("non_numeric", 2),
        ("non_numeric", 3),
        ("non_numeric", 4),
        ("wrong_width", 5),
    ]


def test_non_finite_values_are_rejected_with_position_and_excerpt() -> None:
    rows = _rng_rows(4)
    rows[1, 2] = np.nan
    rows[3, 0] = -np.inf
    chunks, letters = _decode("a.npy", _npy_bytes(rows))
    np.testing.assert_array_equal(_rows(chunks), rows[[0, 2]])
    assert [(x.reason, x.position) for x in letters] == [("non_finite", 1), ("non_finite", 3)]
    assert letters[0].detail == "column 2 is nan"
    assert letters[0].record.startswith("row 1: ") and "nan" in letters[0].record
    assert "-inf" in letters[1].record


def test_out_of_support_values_are_rejected_for_bernoulli_but_not_gaussian() -> None:
    data = b"0,0.5,1,1\n0,2.5,0,0\n-0.1,0,0,0\n"
    chunks, letters = _decode("a.csv", data, likelihood="bernoulli")
    np.testing.assert_array_equal(_rows(chunks), [[0, 0.5, 1, 1]])
    assert [(x.reason, x.position) for x in letters] == [
        ("out_of_support", 2),
        ("out_of_support", 3),
    ]
    assert "column 1 is 2.5" in letters[0].detail
    chunks, letters = _decode("a.csv", data, likelihood="gaussian")
    assert letters == [] and len(_rows(chunks)) == 3


def test_record_excerpt_of_a_long_row_is_truncated() -> None:
    rows = np.zeros((1, 784), np.float32)
    rows[0, 700] = np.nan
    _, (letter,) = _decode("a.npy", _npy_bytes(rows), input_dim=784)
    excerpt = letter.record.removeprefix("row 0: ")
    assert letter.record.startswith("row 0: ") and len(excerpt) <= EXCERPT_CHARS
    assert excerpt.endswith("...")


# --- Whole bad files ------------------------------------------------------------------------


def _only_letter(name: str, data: bytes) -> DeadLetter:
    chunks, letters = _decode(name, data)
    assert chunks == [] and len(letters) == 1, letters
    assert letters[0].source == name and letters[0].position is None
    assert len(letters[0].record) <= EXCERPT_CHARS + 40
    return letters[0]


def test_pickled_object_npy_is_rejected_and_never_unpickled(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "unpickled"
    objects = np.array([_Marker(marker), 1], dtype=object)
    assert _only_letter("obj.npy", _npy_bytes(objects, allow_pickle=True)).reason == (
        "pickled_object"
    )
    # A bare pickle saved under .npy, and an object array inside an archive.
    assert _only_letter("raw.npy", pickle.dumps(_Marker(marker))).reason == "pickled_object"
    buffer = io.BytesIO()
    np.savez(buffer, good=_rng_rows(2), bad=objects)
    assert _only_letter("obj.npz", buffer.getvalue()).reason == "pickled_object"
    assert not marker.exists()
    # The marker does work: loading with pickles allowed would have created it.
    np.load(io.BytesIO(_npy_bytes(objects, allow_pickle=True)), allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("truncated.npy", lambda: _npy_bytes(_rng_rows(10))[:-7]),
        ("header-only.npy", lambda: _npy_bytes(_rng_rows(10))[:20]),
        ("truncated.npz", lambda: _npz_bytes()[: len(_npz_bytes()) // 2]),
        ("garbage.npz", lambda: np.random.default_rng(1).bytes(3000)),
        ("garbage.jsonl", lambda: np.random.default_rng(2).bytes(3000)),
        ("prose.jsonl", lambda: b"this is not\nJSON at all\n"),
        ("garbage.csv", lambda: np.random.default_rng(3).bytes(3000)),
        ("garbage.tfrecord", lambda: np.random.default_rng(4).bytes(3000)),
    ],
)
def test_unparseable_file_is_one_dead_letter(name: str, corrupt) -> None:
    letter = _only_letter(name, corrupt())
    assert letter.reason == "unparseable_file"
    assert letter.record.startswith("file of ")


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, a=_rng_rows(50))
    return buffer.getvalue()


def test_corrupt_npz_member_is_unparseable(tmp_path: pathlib.Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.npy", _npy_bytes(_rng_rows(3))[:-5])
    assert _only_letter("a.npz", buffer.getvalue()).reason == "unparseable_file"


def test_array_of_strings_is_non_numeric() -> None:
    assert _only_letter("s.npy", _npy_bytes(np.array(["a", "b"]))).reason == "non_numeric"


def test_unknown_suffix_is_unsupported_format() -> None:
    letter = _only_letter("data.parquet", b"PAR1....")
    assert letter.reason == "unsupported_format" and "'.parquet'" in letter.detail


def test_truncated_tfrecord_keeps_complete_records_and_rejects_the_rest(
    tmp_path: pathlib.Path,
) -> None:
    rows = _rng_rows(3)
    data = _tfrecord_bytes(tmp_path, rows)
    chunks, letters = _decode("a.tfrecord", data[:-10])
    np.testing.assert_array_equal(_rows(chunks), rows[:2])
    (letter,) = letters
    assert (letter.reason, letter.position) == ("unparseable_file", 2)
    assert "truncated" in letter.detail and letter.record.startswith("record 2: ")


def test_bad_tfrecord_records_are_rejected_one_by_one(tmp_path: pathlib.Path) -> None:
    import tensorflow as tf

    path = tmp_path / "a.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        ints = tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2, 3, 4]))
        writer.write(
            tf.train.Example(features=tf.train.Features(feature={"x": ints})).SerializeToString()
        )
        writer.write(b"\xff\xff not a protobuf")
        short = tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, 0.5, 0.5]))
        writer.write(
            tf.train.Example(features=tf.train.Features(feature={"x": short})).SerializeToString()
        )
    chunks, letters = _decode("a.tfrecord", path.read_bytes())
    assert chunks == []
    assert [(x.reason, x.position) for x in letters] == [
        ("non_numeric", 0),
        ("non_numeric", 1),
        ("wrong_width", 2),
    ]
    assert letters[2].record == "record 2: 0.5,0.5,0.5"


def test_bad_likelihood_is_an_argument_error_not_a_dead_letter() -> None:
    with pytest.raises(ValueError, match="likelihood"):
        list(decode_file("a.csv", b"1,1,1,1", D, "poisson", "default"))


# --- validate_rows --------------------------------------------------------------------------


def test_validate_rows_reason_priority_and_dtypes() -> None:
    values = np.array(
        [[0.5, 0.5], [np.nan, 7.0], [7.0, 0.5], [1e300, 0.5], [1.0, 0.0]], dtype=np.float64
    )
    good, rejected = validate_rows(np.asfortranarray(values), 2, "bernoulli")
    assert good.dtype == np.float32 and good.flags.c_contiguous
    np.testing.assert_array_equal(good, [[0.5, 0.5], [1.0, 0.0]])
    assert [(i, reason) for i, reason, _ in rejected] == [
        (1, "non_finite"),
        (2, "out_of_support"),
        (3, "non_finite"),
    ]
    assert "too large for float32" in rejected[2][2]
    good, rejected = validate_rows(values, 3, "gaussian")
    assert good.shape == (0, 3) and {reason for _, reason, _ in rejected} == {"wrong_width"}
    assert len(rejected) == 5
    good, rejected = validate_rows(np.array([[0, 1], [3, 1]], dtype=np.int64), 2, "gaussian")
    assert good.dtype == np.float32 and rejected == []


def test_validate_rows_argument_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        validate_rows(np.zeros(3), 3, "bernoulli")
    with pytest.raises(ValueError, match="likelihood"):
        validate_rows(np.zeros((1, 3)), 3, "poisson")
    with pytest.raises(TypeError, match="numeric"):
        validate_rows(np.array([["a", "b"]]), 2, "bernoulli")


# --- DeadLetter and WriteDeadLetters --------------------------------------------------------


def test_dead_letter_rejects_unknown_reasons_and_serialises() -> None:
    with pytest.raises(ValueError, match="reason"):
        DeadLetter("s", "bad_vibes", "d", "r")
    letter = DeadLetter("s", "non_finite", "d", "row 3: nan", position=3)
    assert json.loads(letter.to_json()) == {
        "source": "s",
        "reason": "non_finite",
        "detail": "d",
        "record": "row 3: nan",
        "position": 3,
        "origin": None,
    }


def test_write_dead_letters_appends_json_lines_and_counts_reasons(tmp_path) -> None:
    letters = [
        DeadLetter("a.csv", "non_numeric", "cell", "line 2: x", 2),
        DeadLetter("a.npy", "non_finite", "nan", "row 0: nan", 0),
        DeadLetter("b.npy", "non_finite", "inf", "row 5: inf", 5),
        DeadLetter("c.bin", "unsupported_format", "suffix", "file of 3 bytes: b'abc'"),
    ]
    pipeline = beam.Pipeline(options=_options())
    passed = pipeline | beam.Create(letters) | WriteDeadLetters(str(tmp_path))
    assert_that(passed, equal_to(letters))
    result = pipeline.run()
    result.wait_until_finish()

    files = list((tmp_path / "dead_letter").glob("dead_letter-*-*.jsonl"))
    assert len(files) == 1
    written = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert all(isinstance(w.pop("seen_unix_seconds"), float) for w in written)
    assert sorted(written, key=json.dumps) == sorted(
        (json.loads(x.to_json()) for x in letters), key=json.dumps
    )
    counters = result.metrics().query(MetricsFilter().with_namespace("aevb"))["counters"]
    counts = {c.key.metric.name: c.committed for c in counters if c.committed}
    assert counts == {
        "records_rejected_total_non_numeric": 1,
        "records_rejected_total_non_finite": 2,
        "records_rejected_total_unsupported_format": 1,
    }


# --- Beam DoFns -----------------------------------------------------------------------------


def _as_lists(chunk: KeyedChunk):
    key, chunk = chunk.key, chunk.rows
    assert chunk.dtype == np.float32 and chunk.flags.c_contiguous
    return key, chunk.tolist()


def test_decode_files_in_a_pipeline(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("0,1,0,1\n1,1,0,0\nnan,0,0,0\n")
    pickled = tmp_path / "obj.npy"
    pickled.write_bytes(_npy_bytes(np.array([None], dtype=object), allow_pickle=True))
    missing = str(tmp_path / "missing.csv")
    with beam.Pipeline(options=_options()) as pipeline:
        outputs = (
            pipeline
            | beam.Create([FileMetadata(str(good), good.stat().st_size), str(pickled), missing])
            | beam.ParDo(DecodeFiles(D, "bernoulli")).with_outputs(DEAD_LETTER_TAG, main="chunks")
        )
        assert_that(
            outputs.chunks | beam.Map(_as_lists),
            equal_to([("default", [[0, 1, 0, 1], [1, 1, 0, 0]])]),
            label="Chunks",
        )
        assert_that(
            outputs[DEAD_LETTER_TAG] | beam.Map(lambda x: (x.source, x.reason, x.position)),
            equal_to(
                [
                    (str(good), "non_finite", 3),
                    (str(pickled), "pickled_object", None),
                    (missing, "unparseable_file", None),
                ]
            ),
            label="DeadLetters",
        )


def test_decode_records_batches_keys_and_rejects() -> None:
    records = [
        (b"k", b"[0.1, 0.2]"),
        (None, b'{"x": [0.3, 0.4], "key": "j"}'),
        b"0.5,0.6",
        "0.7,0.8",
        (b"k", b"0,1"),
        b"oops",
        (None, b"[1, 2, 3]"),
        (None, b"[1, 2]"),
        b"\xff\xfe",
    ]
    with beam.Pipeline(options=_options()) as pipeline:
        outputs = (
            pipeline
            | beam.Create(records)
            | DecodeRecords(2, "bernoulli", source="kafka:localhost:9092/t")
        )
        rows = (
            outputs[None]
            | beam.FlatMap(lambda chunk: [(chunk.key, row) for row in _as_lists(chunk)[1]])
            | beam.Map(lambda kv: (kv[0], [round(v, 6) for v in kv[1]]))
        )
        assert_that(
            rows,
            equal_to(
                [
                    ("k", [0.1, 0.2]),
                    ("j", [0.3, 0.4]),
                    ("default", [0.5, 0.6]),
                    ("default", [0.7, 0.8]),
                    ("k", [0.0, 1.0]),
                ]
            ),
            label="Rows",
        )
        assert_that(
            outputs[DEAD_LETTER_TAG] | beam.Map(lambda x: (x.source, x.reason, x.position)),
            equal_to(
                [
                    ("kafka:localhost:9092/t", reason, None)
                    for reason in ("non_numeric", "wrong_width", "out_of_support", "non_numeric")
                ]
            ),
            label="DeadLetters",
        )


def _chunk_summary(chunk: KeyedChunk, timestamp=beam.DoFn.TimestampParam):
    return len(chunk), float(chunk.rows[:, 0].max()), float(timestamp)


@pytest.mark.parametrize("streaming", [False, True])
def test_decode_records_chunks_carry_the_latest_timestamp_of_their_messages(
    streaming: bool,
) -> None:
    # Message i is the row [i, 0] at event time i: a chunk's timestamp must be its largest i
    # (not the end of the global window, which is where Beam's BatchElements puts a batch).
    n = CHUNK_ROWS + 500
    with beam.Pipeline(options=_options(streaming)) as pipeline:
        outputs = (
            pipeline
            | beam.Create(range(n))
            | beam.Map(lambda i: beam.window.TimestampedValue(json.dumps([i, 0]).encode(), i))
            | DecodeRecords(2, "gaussian")
        )
        summaries = outputs[None] | beam.Map(_chunk_summary)
        assert_that(
            summaries | beam.Map(lambda s: s[1] == s[2] and s[0] <= CHUNK_ROWS) | beam.Distinct(),
            equal_to([True]),
            label="Timestamps",
        )
        assert_that(
            summaries | beam.Map(lambda s: s[0]) | beam.CombineGlobally(sum),
            equal_to([n]),
            label="Rows",
        )


def test_validate_chunks_passes_valid_rows_and_rejects_the_rest() -> None:
    chunk = np.array([[0.0, 1.0], [np.inf, 0.0], [0.25, 0.75]], dtype=np.float64)
    with beam.Pipeline(options=_options()) as pipeline:
        outputs = (
            pipeline
            | beam.Create([("m", chunk)])
            | beam.ParDo(ValidateChunks(2, "bernoulli", source="dataset:x")).with_outputs(
                DEAD_LETTER_TAG, main="chunks"
            )
        )
        assert_that(
            outputs.chunks | beam.Map(_as_lists),
            equal_to([("m", [[0.0, 1.0], [0.25, 0.75]])]),
            label="Chunks",
        )
        assert_that(
            outputs[DEAD_LETTER_TAG] | beam.Map(lambda x: (x.source, x.reason, x.record)),
            equal_to([("dataset:x", "non_finite", "chunk row 1: inf,0")]),
            label="DeadLetters",
        )


@pytest.mark.parametrize("key", ["nl\n", "tab\tkey", "nul\x00", "cr\r", "bell\x07", "\nlead"])
def test_keys_with_control_characters_are_dead_letters(key: str) -> None:
    # `re.match` with "$" let "nl\n" through: checkpoints/nl\n/ and snapshots/nl\n/ appeared.
    data = (json.dumps({"x": [0, 1, 0, 1], "key": key}) + "\n[1, 1, 0, 0]\n").encode()
    chunks, letters = _decode("keys.jsonl", data)
    assert [(letter.reason, letter.position) for letter in letters] == [("invalid_key", 1)]
    assert [key for key, _ in chunks] == ["default"]
    with pytest.raises(ValueError, match="must start with a letter or digit"):
        validate_model_key(key)

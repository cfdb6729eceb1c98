"""Decoding files and messages into keyed chunks of valid rows, and bad input into dead letters.

Decoding never raises for bad content: a file that cannot be parsed at all becomes exactly one
:class:`~pipeline.ingest.dead_letter.DeadLetter` (``unparseable_file``, ``pickled_object``,
``unsupported_format``, ``too_large`` for one that holds or expands to more than
``max_bytes``, or ``non_numeric`` for an array of strings), and a bad row becomes one
dead letter for that row (``wrong_width``, ``non_numeric``, ``non_finite``,
``out_of_support``) while the rest of the file still trains. ``non_numeric`` also covers
records that are not numbers in the expected form (a JSON line that is not an array or
``{"x": [...]}``, a TFRecord without a float feature ``x``).

File formats, chosen by suffix (:data:`SUPPORTED_SUFFIXES`):

- ``.npy``: a 1-D array of ``input_dim`` values is one row, a 2-D array is rows, higher
  dimensions are flattened per row (``[N, 28, 28]`` images). Loaded with
  ``allow_pickle=False``: object arrays and pickles are rejected, never unpickled.
- ``.npz``: every array of the archive, in sorted name order, with the ``.npy`` rules.
- ``.csv``: comma-separated numbers, one row per line, optionally one header line (a first
  line in which no cell is a number); blank lines are skipped.
- ``.jsonl``: one JSON array of numbers per line, or an object ``{"x": [...], "key": "k"}``.
- ``.tfrecord``: uncompressed TFRecord framing of ``tf.train.Example`` with a ``float_list``
  feature ``x`` and an optional ``bytes_list`` feature ``key``. A truncated file yields the
  complete records and one ``unparseable_file`` dead letter for the rest. The framing is
  checked, its CRCs are not (no CRC32C implementation among the dependencies).
- any of these with ``.gz`` after it (``part-1.csv.gz``): gzip'd, decompressed within
  ``max_bytes``.

Rows without a key get ``default_key``. Valid rows are emitted as :class:`KeyedChunk`s
(key, float32 [k, D] rows, source, positions, origin) of at most :data:`CHUNK_ROWS` rows.

>>> data = b"x0,x1\\n0.0,1.0\\n0.5,oops\\n1.0,0.25\\n"
>>> letter, chunk = decode_file("a.csv", data, 2, "bernoulli", "default")
>>> letter
DeadLetter(source='a.csv', reason='non_numeric', detail="cell 2 ('oops') is not a number", \
record='line 3: 0.5,oops', position=3)
>>> chunk.key, chunk.rows.tolist(), chunk.positions.tolist()
('default', [[0.0, 1.0], [1.0, 0.25]], [2, 4])
>>> chunk.origin == letter.origin == content_origin("a.csv", data)
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.ingest.dead_letter import (
    DEAD_LETTER_TAG,
    DeadLetter,
    excerpt,
    record_locator,
    row_excerpt,
)
from pipeline.ingest.keys import MODEL_KEY_RULE, is_model_key
from pipeline.ingest.validation import validate_rows, wrong_width_detail
from vae.config import check_likelihood

__all__ = [
    "CHUNK_ROWS",
    "DEFAULT_MAX_FILE_BYTES",
    "SUPPORTED_SUFFIXES",
    "DecodeFiles",
    "DecodeRecords",
    "KeyedChunk",
    "ValidateChunks",
    "content_origin",
    "decode_file",
]

SUPPORTED_SUFFIXES = (".npy", ".npz", ".csv", ".jsonl", ".tfrecord")
CHUNK_ROWS = 1000
# What one file may hold, or expand to (.npz, .gz): decoding takes a few times this much
# memory, and a 2 MB archive of zeros can declare gigabytes.
DEFAULT_MAX_FILE_BYTES = 256 * 2**20

_TFRECORD_HEADER = struct.Struct("<QI")  # record length, masked CRC32C of the length
_TFRECORD_FOOTER_BYTES = 4  # masked CRC32C of the data
# How many bytes of a rejected file or record to show in a dead letter.
_RAW_EXCERPT_BYTES = 96


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds arrays
class KeyedChunk:
    """Valid rows of one model key from one source: what decoding yields, what travels.

    ``positions`` gives each row's place in its source as dead letters count it (int64
    [k]), or is None where unknown or meaningless (Kafka messages, data-set replays).
    ``origin`` names a file and its content (`content_origin`): the trainer's read ledger counts
    positions per origin, so that a restarted job trains no record twice.
    """

    key: str
    rows: np.ndarray  # float32 [k, D], C-contiguous
    source: str
    positions: np.ndarray | None = None
    origin: str | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass(frozen=True)
class _Block:
    """Rows of one model key from one input, not yet validated."""

    key: str
    values: np.ndarray  # 2-D, numeric
    unit: str  # what a position counts: "row", "line", "record", ...
    positions: np.ndarray | None  # of each row; None when unknown (Kafka messages)


class _FileError(Exception):
    """The whole input is rejected with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class _Lines:
    """Text records with where they came from, for the line-oriented parsers."""

    source: str
    unit: str
    texts: list[str]
    positions: list[int] | None
    keys: list[str]

    def letter(self, index: int, reason: str, detail: str) -> DeadLetter:
        position = None if self.positions is None else self.positions[index]
        record = record_locator(self.unit, position, self.texts[index])
        return DeadLetter(self.source, reason, detail, record, position)

    def subset(self, indices: Sequence[int]) -> _Lines:
        return _Lines(
            self.source,
            self.unit,
            [self.texts[i] for i in indices],
            None if self.positions is None else [self.positions[i] for i in indices],
            [self.keys[i] for i in indices],
        )


def decode_file(
    path: str,
    data: bytes,
    input_dim: int,
    likelihood: str,
    default_key: str,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[KeyedChunk | DeadLetter]:
    """Yields a `KeyedChunk` of valid rows and a DeadLetter for each rejection.

    The format follows the suffix of ``path`` (see the module docstring); a further
    ``.gz`` is decompressed first. Nothing the file holds may expand beyond ``max_bytes``
    (after decompression, checked before allocating): such a file is one ``too_large``
    dead letter. Raises only for bad arguments (``likelihood``), never for bad content.
    """
    check_likelihood(likelihood)
    name = path.lower()
    compressed = name.endswith(".gz")
    suffix = os.path.splitext(name.removesuffix(".gz"))[1]
    parser = _FILE_PARSERS.get(suffix)
    try:
        if compressed:
            data = _gunzip(data, max_bytes)
        elif len(data) > max_bytes:
            raise _FileError("too_large", f"{len(data):,} bytes, more than {max_bytes:,}")
        if parser is None:
            raise _FileError(
                "unsupported_format",
                f"suffix {suffix or '(none)'!r} is not one of {', '.join(SUPPORTED_SUFFIXES)}",
            )
        # Parsed and validated completely before anything is emitted, so that a file
        # rejected as a whole has trained nothing.
        blocks, letters = parser(path, data, input_dim, default_key, max_bytes)
        items = [*letters, *_validated(path, blocks, input_dim, likelihood)]
    except _FileError as error:
        items = [_file_letter(path, data, error.reason, error.detail)]
    except Exception as error:  # no input may end the job (RecursionError, MemoryError, ...)
        items = [_file_letter(path, data, "unparseable_file", f"cannot parse: {_describe(error)}")]
    # Everything a file yields names its content: a restarted job that reads it again trains
    # no record twice (the trainer's read ledger) and writes no dead letter twice.
    origin = content_origin(path, data)
    for item in items:
        yield dataclasses.replace(item, origin=origin)


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """The content of gzip'd `data`, decompressed no further than `max_bytes` (a gzip bomb
    of a few megabytes would otherwise fill the memory)."""
    stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    try:
        content = stream.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise _FileError("unparseable_file", f"not gzip data: {exc}") from exc
    if len(content) > max_bytes:
        raise _FileError("too_large", f"it decompresses to more than {max_bytes:,} bytes")
    if not stream.eof:
        raise _FileError("unparseable_file", "truncated gzip data")
    return content


def _describe(error: BaseException) -> str:
    """An exception in one short line: its type and the start of its message."""
    return excerpt(f"{type(error).__name__}: {error}", 160)


def _file_letter(source: str, data: bytes, reason: str, detail: str) -> DeadLetter:
    record = record_locator(f"file of {len(data)} bytes", None, repr(data[:_RAW_EXCERPT_BYTES]))
    return DeadLetter(source, reason, detail, record)


def content_origin(path: str, data: bytes) -> str:
    """What names a file and its content: its path and a digest of its bytes. New content
    under a name read before is another file, and so is a copy under another name (files
    that repeat data, such as one file per epoch, each train).

    >>> content_origin("in/a.csv", b"0,1\\n")
    'in/a.csv@b2:549cce2198b211eb7bedefd0259ac5b1'
    """
    return f"{path}@b2:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def _validated(
    source: str,
    blocks: Iterable[_Block],
    input_dim: int,
    likelihood: str,
    keep_positions: bool = True,
) -> Iterator[KeyedChunk | DeadLetter]:
    for block in blocks:
        if not is_model_key(block.key):
            # A key becomes a directory name and a metric label: an odd one must not
            # reach the trainer, where it would stop the job.
            for index in range(len(block.values)):
                position = None if block.positions is None else int(block.positions[index])
                record = record_locator(block.unit, position, row_excerpt(block.values[index]))
                detail = f"model key {block.key[:64]!r} {MODEL_KEY_RULE}"
                yield DeadLetter(source, "invalid_key", detail, record, position)
            continue
        good, rejected = validate_rows(block.values, input_dim, likelihood)
        for index, reason, detail in rejected:
            position = None if block.positions is None else int(block.positions[index])
            record = record_locator(block.unit, position, row_excerpt(block.values[index]))
            yield DeadLetter(source, reason, detail, record, position)
        positions = None
        if keep_positions and block.positions is not None:
            kept = np.ones(len(block.values), dtype=bool)
            kept[[index for index, _, _ in rejected]] = False
            positions = np.asarray(block.positions, dtype=np.int64)[kept]
        for start in range(0, len(good), CHUNK_ROWS):
            end = start + CHUNK_ROWS
            yield KeyedChunk(
                block.key,
                good[start:end],
                source,
                None if positions is None else positions[start:end],
            )


# --- NumPy ----------------------------------------------------------------------------------


def _read_npy(data: bytes, what: str, max_bytes: int) -> np.ndarray:
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
    except ValueError as exc:
        # np.load would take any non-.npy bytes for a pickle; say which it is without ever
        # unpickling: protocol 2+ pickles start with the PROTO opcode 0x80.
        if data[:1] == b"\x80":
            raise _FileError("pickled_object", f"{what} is a Python pickle, not .npy") from exc
        raise _FileError("unparseable_file", f"{what} is not .npy: {exc}") from exc
    _check_npy_size(stream, version, what, len(data), max_bytes)
    stream.seek(0)
    try:
        array = np.lib.format.read_array(stream, allow_pickle=False)
    except ValueError as exc:
        # NumPy refuses object (pickled) arrays before reading their data.
        if "allow_pickle" in str(exc):
            raise _FileError(
                "pickled_object", f"{what} holds Python objects (pickled data), not numbers"
            ) from exc
        raise _FileError("unparseable_file", f"{what}: {exc}") from exc
    except Exception as exc:  # truncated or damaged arrays raise a variety of types
        raise _FileError("unparseable_file", f"{what}: {exc!r}") from exc
    if array.dtype.kind not in "biuf":
        raise _FileError("non_numeric", f"{what} has dtype {array.dtype}, not numbers")
    return _as_rows(array)


def _check_npy_size(
    stream: io.BytesIO, version: tuple[int, int], what: str, size: int, max_bytes: int
) -> None:
    """Rejects an array whose header promises more than `max_bytes`, or more data than the
    file holds, before NumPy allocates it (NumPy allocates first, then reads)."""
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0  # 3.0 differs only in the header's encoding
    )
    try:
        shape, _, dtype = read_header(stream)
    except Exception:  # NumPy rejects the header again in read_array, with its own message
        return
    if dtype.hasobject:
        return  # refused as pickled data by read_array, before any allocation
    needed = math.prod(shape) * dtype.itemsize
    if needed > max_bytes:
        raise _FileError(
            "too_large", f"{what} holds {needed:,} bytes, more than the {max_bytes:,} allowed"
        )
    if needed > size:
        raise _FileError(
            "unparseable_file", f"{what}: its header promises {needed:,} bytes, it has {size:,}"
        )


def _as_rows(array: np.ndarray) -> np.ndarray:
    """A 1-D array is one row; higher dimensions are flattened per row ([N, 28, 28] images)."""
    if array.ndim < 2:
        return array.reshape(1, -1)
    return array.reshape(array.shape[0], int(np.prod(array.shape[1:])))


def _parse_npy(
    path: str, data: bytes, input_dim: int, default_key: str, max_bytes: int
) -> tuple[list[_Block], list[DeadLetter]]:
    del input_dim  # widths are checked by validation
    rows = _read_npy(data, "the file", max_bytes)
    return [_Block(default_key, rows, "row", np.arange(len(rows)))], []


def _parse_npz(
    path: str, data: bytes, input_dim: int, default_key: str, max_bytes: int
) -> tuple[list[_Block], list[DeadLetter]]:
    del input_dim
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = _npz_members(archive, max_bytes)
    except _FileError:
        raise
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, ...
        raise _FileError("unparseable_file", f"not a readable .npz (zip) archive: {exc!r}") from exc
    blocks = []
    for name in sorted(members):
        array_name = name.removesuffix(".npy")
        rows = _read_npy(members[name], f"array {array_name!r}", max_bytes)
        blocks.append(_Block(default_key, rows, f"array {array_name!r} row", np.arange(len(rows))))
    return blocks, []


def _npz_members(archive: zipfile.ZipFile, max_bytes: int) -> dict[str, bytes]:
    """Every member, decompressed, as long as all of them stay within `max_bytes`: the sizes
    the archive declares are checked first, and each read stops past the limit, since a
    forged archive may declare less than it holds (a zip bomb)."""
    declared = sum(info.file_size for info in archive.infolist())
    if declared > max_bytes:
        raise _FileError(
            "too_large", f"the archive expands to {declared:,} bytes, more than {max_bytes:,}"
        )
    members, total = {}, 0
    for info in archive.infolist():
        with archive.open(info) as member:
            members[info.filename] = member.read(max_bytes - total + 1)
        total += len(members[info.filename])
        if total > max_bytes:
            raise _FileError("too_large", f"the archive expands to more than {max_bytes:,} bytes")
    return members


# --- Text -----------------------------------------------------------------------------------


def _text_lines(path: str, data: bytes, default_key: str) -> _Lines:
    """The non-blank lines of a text file, with 1-based line numbers."""
    if b"\0" in data:
        raise _FileError("unparseable_file", "binary data (NUL bytes) in a text file")
    try:
        text = data.decode("utf-8-sig")  # -sig: spreadsheets start CSV files with a BOM
    except UnicodeDecodeError as exc:
        raise _FileError("unparseable_file", f"not UTF-8 text: {exc}") from exc
    numbered = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    return _Lines(
        path,
        "line",
        [line for _, line in numbered],
        [i for i, _ in numbered],
        [default_key] * len(numbered),
    )


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _parse_csv(
    path: str, data: bytes, input_dim: int, default_key: str, max_bytes: int
) -> tuple[list[_Block], list[DeadLetter]]:
    lines = _text_lines(path, data, default_key)
    if lines.texts and not any(_is_number(cell) for cell in lines.texts[0].split(",")):
        lines = lines.subset(range(1, len(lines.texts)))  # the header
    return _csv_blocks(lines, default_key, input_dim)


def _csv_blocks(lines: _Lines, key: str, input_dim: int) -> tuple[list[_Block], list[DeadLetter]]:
    if not lines.texts:
        return [], []
    positions = None if lines.positions is None else np.asarray(lines.positions)
    values = _parse_number_lines(lines.texts)
    if values is not None:
        return [_Block(key, values, lines.unit, positions)], []
    # Some line is bad: parse line by line so that only the bad lines are rejected.
    rows, kept, letters = [], [], []
    for index, text in enumerate(lines.texts):
        cells = text.split(",")
        try:
            row = np.array(cells, dtype=np.float64)
        except ValueError:
            bad = next(i for i, cell in enumerate(cells) if not _is_number(cell))
            detail = f"cell {bad + 1} ({excerpt(cells[bad].strip(), 40)!r}) is not a number"
            letters.append(lines.letter(index, "non_numeric", detail))
            continue
        if len(row) != input_dim:
            letters.append(
                lines.letter(index, "wrong_width", wrong_width_detail(len(row), input_dim))
            )
            continue
        rows.append(row)
        kept.append(index)
    if not rows:
        return [], letters
    block_positions = None if positions is None else positions[kept]
    return [_Block(key, np.stack(rows), lines.unit, block_positions)], letters


def _parse_number_lines(texts: list[str]) -> np.ndarray | None:
    """Lines of comma-separated numbers, all of one width, parsed by pandas' C reader.

    The fast path (15-50 us for a 784-value row, a fifth of NumPy's `loadtxt`, which
    would cost several times a training step): None when any line is not such a line, and
    the caller then parses line by line to reject only the bad ones.
    """
    import pandas as pd  # a dependency of mlxtend: already installed

    if not texts:
        return None
    text = "\n".join(texts)
    width = texts[0].count(",") + 1
    # pandas fills a short row with NaN instead of failing: count the separators first.
    if text.count(",") != len(texts) * (width - 1):
        return None
    try:
        frame = pd.read_csv(
            io.StringIO(text), header=None, dtype=np.float32, na_filter=False, engine="c"
        )
    except (ValueError, pd.errors.ParserError):
        return None
    values = frame.to_numpy()
    return values if values.shape == (len(texts), width) else None


def _parse_jsonl(
    path: str, data: bytes, input_dim: int, default_key: str, max_bytes: int
) -> tuple[list[_Block], list[DeadLetter]]:
    lines = _text_lines(path, data, default_key)
    blocks, letters, parsed = _json_blocks(lines, input_dim)
    if lines.texts and parsed == 0:
        # Not one line is JSON: this is not a JSON-lines file, report it once.
        raise _FileError("unparseable_file", f"none of the {len(lines.texts)} lines is JSON")
    return blocks, letters


_JSON_SHAPE = 'expected a JSON array of numbers or an object {"x": [numbers], "key": "..."}'


def _json_blocks(lines: _Lines, input_dim: int) -> tuple[list[_Block], list[DeadLetter], int]:
    """(blocks by key, dead letters, number of lines that were JSON at all)."""
    stripped = [text.strip() for text in lines.texts]
    if stripped and all(text[:1] == "[" and text[-1:] == "]" for text in stripped):
        # Plain arrays of numbers, no keys: the bracketless lines are CSV, read in C.
        values = _parse_number_lines([text[1:-1] for text in stripped])
        if values is not None and len(set(lines.keys)) == 1:
            positions = None if lines.positions is None else np.asarray(lines.positions)
            return [_Block(lines.keys[0], values, lines.unit, positions)], [], len(stripped)
    letters = []
    parsed = 0
    by_key: dict[str, tuple[list[Any], list[int]]] = {}
    for index, text in enumerate(lines.texts):
        try:
            obj = json.loads(text)
        except ValueError as exc:
            letters.append(lines.letter(index, "non_numeric", f"invalid JSON: {exc}"))
            continue
        except RecursionError:
            detail = "invalid JSON: nested too deeply to parse"
            letters.append(lines.letter(index, "non_numeric", detail))
            continue
        parsed += 1
        key = lines.keys[index]
        if isinstance(obj, dict):
            key = obj.get("key", key)
            obj = obj.get("x")
        if not isinstance(obj, list) or not isinstance(key, str) or not key:
            letters.append(lines.letter(index, "non_numeric", _JSON_SHAPE))
            continue
        rows, indices = by_key.setdefault(key, ([], []))
        rows.append(obj)
        indices.append(index)
    blocks = []
    for key, (rows, indices) in by_key.items():
        block, rejected = _stack_rows(lines.subset(indices), key, rows, input_dim)
        letters.extend(rejected)
        if block is not None:
            blocks.append(block)
    return blocks, letters, parsed


def _stack_rows(
    lines: _Lines, key: str, rows: list[Any], input_dim: int
) -> tuple[_Block | None, list[DeadLetter]]:
    """One block from per-record rows (lists or 1-D arrays); rejects ragged or non-numbers."""
    positions = None if lines.positions is None else np.asarray(lines.positions)
    try:
        # Fast path: one conversion when every record is a flat list of numbers of one length.
        values = np.asarray(rows)
    except ValueError:  # ragged
        values = None
    if values is not None and values.ndim == 2 and values.dtype.kind in "iuf":
        return _Block(key, values, lines.unit, positions), []
    good, kept, letters = [], [], []
    for index, row in enumerate(rows):
        try:
            array = np.asarray(row)
        except ValueError:
            array = None
        if array is None or array.ndim != 1 or array.dtype.kind not in "iuf":
            letters.append(lines.letter(index, "non_numeric", _JSON_SHAPE))
        elif len(array) != input_dim:
            detail = wrong_width_detail(len(array), input_dim)
            letters.append(lines.letter(index, "wrong_width", detail))
        else:
            good.append(array)
            kept.append(index)
    if not good:
        return None, letters
    block_positions = None if positions is None else positions[kept]
    return _Block(key, np.stack(good), lines.unit, block_positions), letters


# --- TFRecord -------------------------------------------------------------------------------


def _tfrecord_frames(data: bytes) -> tuple[list[bytes], str | None]:
    """(payloads of the complete records, why the rest cannot be read or None)."""
    payloads = []
    offset = 0
    while offset < len(data):
        remaining = len(data) - offset
        if remaining < _TFRECORD_HEADER.size:
            return payloads, f"truncated TFRecord header at byte {offset}: {remaining} bytes left"
        (length, _) = _TFRECORD_HEADER.unpack_from(data, offset)
        needed = _TFRECORD_HEADER.size + length + _TFRECORD_FOOTER_BYTES
        if needed > remaining:
            return payloads, (
                f"truncated TFRecord at byte {offset}: the record needs {needed} bytes, "
                f"{remaining} are left"
            )
        start = offset + _TFRECORD_HEADER.size
        payloads.append(data[start : start + length])
        offset += needed
    return payloads, None


def _parse_examples_at_once(
    tf: Any, payloads: list[bytes], input_dim: int, default_key: str
) -> list[_Block] | None:
    """All records in one call of TensorFlow's parser (5-10x faster than one by one).

    None unless every record is a tf.train.Example with exactly ``input_dim`` floats in "x".
    """
    if not payloads:
        return None
    features = {"x": tf.io.VarLenFeature(tf.float32), "key": tf.io.VarLenFeature(tf.string)}
    try:
        parsed = tf.io.parse_example(payloads, features)
    except tf.errors.InvalidArgumentError:  # a record is not an Example, or "x" not floats
        return None
    n = len(payloads)
    row_of_value = parsed["x"].indices.numpy()[:, 0]
    if len(row_of_value) != n * input_dim or np.any(
        np.bincount(row_of_value, minlength=n) != input_dim
    ):
        return None
    # The values of a VarLenFeature come in row-major order.
    values = parsed["x"].values.numpy().reshape(n, input_dim)
    keys = np.full(n, default_key, dtype=object)
    row_of_key = parsed["key"].indices.numpy()[:, 0]
    if len(row_of_key):
        rows_with_key, first = np.unique(row_of_key, return_index=True)
        key_bytes = parsed["key"].values.numpy()[first]
        keys[rows_with_key] = [k.decode("utf-8", errors="replace") for k in key_bytes]
    blocks = []
    for key in dict.fromkeys(keys.tolist()):
        positions = np.flatnonzero(keys == key)
        blocks.append(_Block(key, values[positions], "record", positions))
    return blocks


def _parse_tfrecord(
    path: str, data: bytes, input_dim: int, default_key: str, max_bytes: int
) -> tuple[list[_Block], list[DeadLetter]]:
    payloads, truncated = _tfrecord_frames(data)
    if truncated is not None and not payloads:
        raise _FileError("unparseable_file", truncated)
    # Imported here: TensorFlow takes seconds to import and only this format needs it.
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    if truncated is None and (
        blocks := _parse_examples_at_once(tf, payloads, input_dim, default_key)
    ):
        return blocks, []
    # Some record is bad (or the file truncated): parse record by record to reject only those.
    letters: list[DeadLetter] = []
    by_key: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for index, payload in enumerate(payloads):
        try:
            feature = tf.train.Example.FromString(payload).features.feature
            problem = None
            if "x" not in feature or feature["x"].WhichOneof("kind") != "float_list":
                problem = "no float_list feature 'x'"
        except DecodeError as exc:
            problem = f"not a tf.train.Example: {exc}"
        if problem is not None:
            record = record_locator("record", index, repr(payload[:_RAW_EXCERPT_BYTES]))
            letters.append(DeadLetter(path, "non_numeric", problem, record, index))
            continue
        key = default_key
        if "key" in feature and feature["key"].bytes_list.value:
            key = feature["key"].bytes_list.value[0].decode("utf-8", errors="replace")
        values = feature["x"].float_list.value
        row = np.fromiter(values, dtype=np.float32, count=len(values))
        if len(row) != input_dim:
            # Rejected here: rows of another width cannot join the block.
            record = record_locator("record", index, row_excerpt(row))
            detail = wrong_width_detail(len(row), input_dim)
            letters.append(DeadLetter(path, "wrong_width", detail, record, index))
            continue
        rows, positions = by_key.setdefault(key, ([], []))
        rows.append(row)
        positions.append(index)
    if truncated is not None:
        index = len(payloads)
        record = record_locator("record", index, f"the rest of a file of {len(data)} bytes")
        letters.append(DeadLetter(path, "unparseable_file", truncated, record, index))
    blocks = [
        _Block(key, np.stack(rows), "record", np.asarray(positions))
        for key, (rows, positions) in by_key.items()
    ]
    return blocks, letters


# Each takes (path, data, input_dim, default_key, max_bytes); text and TFRecord content is
# bounded by the bytes read, only NumPy's formats can expand beyond them.
_FILE_PARSERS = {
    ".npy": _parse_npy,
    ".npz": _parse_npz,
    ".csv": _parse_csv,
    ".jsonl": _parse_jsonl,
    ".tfrecord": _parse_tfrecord,
}


# --- Beam -----------------------------------------------------------------------------------


def _tagged(
    items: Iterable[KeyedChunk | DeadLetter],
) -> Iterator[KeyedChunk | beam.pvalue.TaggedOutput]:
    for item in items:
        yield _tag(item, item)


def _tag(item: KeyedChunk | DeadLetter, value: Any) -> Any:
    """``value`` (``item``, possibly wrapped with a timestamp) for the output ``item`` goes to."""
    return (
        beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, value) if isinstance(item, DeadLetter) else value
    )


class DecodeFiles(beam.DoFn):
    """File path (or the ``FileMetadata`` of ``fileio.MatchFiles``) -> `KeyedChunk`s.

    Use as ``beam.ParDo(DecodeFiles(...)).with_outputs(DEAD_LETTER_TAG, main="chunks")``. A
    file that cannot be read (e.g. deleted since it was matched) is an ``unparseable_file``
    dead letter. Files are read whole, up to ``max_file_bytes`` (see `decode_file`).
    """

    def __init__(
        self,
        input_dim: int,
        likelihood: str,
        default_key: str = "default",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        check_likelihood(likelihood)
        self._input_dim = input_dim
        self._likelihood = likelihood
        self._default_key = default_key
        self._max_bytes = max_file_bytes

    def process(self, element: Any) -> Iterator[Any]:
        path = element if isinstance(element, str) else element.path
        try:
            # UNCOMPRESSED: decode_file decompresses .gz itself, within the limit, and .npz
            # must not be "decompressed". One byte past the limit says the file is too large.
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read(self._max_bytes + 1)
        except OSError as exc:
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER_TAG,
                DeadLetter(path, "unparseable_file", f"cannot read: {exc}", "file: (unread)"),
            )
            return
        yield from _tagged(
            decode_file(
                path, data, self._input_dim, self._likelihood, self._default_key, self._max_bytes
            )
        )


@dataclasses.dataclass
class _Buffer:
    """Messages of one window waiting to be decoded together, and their latest timestamp."""

    elements: list[Any] = dataclasses.field(default_factory=list)
    timestamp: Timestamp = MIN_TIMESTAMP


class _DecodeRecordsFn(beam.DoFn):
    """Buffers messages per window within a bundle and decodes them together."""

    def __init__(self, input_dim: int, likelihood: str, default_key: str, source: str) -> None:
        self._input_dim = input_dim
        self._likelihood = likelihood
        self._default_key = default_key
        self._source = source

    def start_bundle(self) -> None:
        self._buffers: dict[Any, _Buffer] = {}

    def process(
        self,
        element: Any,
        timestamp: Timestamp = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterator[Any]:
        buffer = self._buffers.setdefault(window, _Buffer())
        buffer.elements.append(element)
        buffer.timestamp = max(buffer.timestamp, timestamp)
        if len(buffer.elements) >= CHUNK_ROWS:
            del self._buffers[window]
            for item in self._decode(buffer.elements):
                value = beam.window.TimestampedValue(item, buffer.timestamp)
                yield _tag(item, value)

    def finish_bundle(self) -> Iterator[Any]:
        for window, buffer in self._buffers.items():
            for item in self._decode(buffer.elements):
                yield _tag(item, WindowedValue(item, buffer.timestamp, [window]))
        self._buffers = {}

    def _decode(self, messages: list[Any]) -> list[KeyedChunk | DeadLetter]:
        """The messages decoded together; should that fail on some input nobody foresaw,
        one by one, so that only the offending messages become dead letters."""
        try:
            return list(self._decode_together(messages))
        except Exception as error:  # no input may end the job (RecursionError, ...)
            if len(messages) == 1:
                return [self._message_letter(messages[0], error)]
        items: list[KeyedChunk | DeadLetter] = []
        for message in messages:
            try:
                items.extend(self._decode_together([message]))
            except Exception as error:
                items.append(self._message_letter(message, error))
        return items

    def _message_letter(self, message: Any, error: BaseException) -> DeadLetter:
        value = message[1] if isinstance(message, tuple) else message
        record = record_locator("message", None, repr(value)[:_RAW_EXCERPT_BYTES])
        detail = f"cannot decode: {_describe(error)}"
        return DeadLetter(self._source, "non_numeric", detail, record)

    def _decode_together(self, messages: list[Any]) -> Iterator[KeyedChunk | DeadLetter]:
        texts, keys, json_indices, csv_indices = [], [], [], []
        for message in messages:
            key_bytes, value = message if isinstance(message, tuple) else (None, message)
            key = key_bytes.decode("utf-8", errors="replace") if key_bytes else self._default_key
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    record = record_locator("message", None, repr(value[:_RAW_EXCERPT_BYTES]))
                    yield DeadLetter(self._source, "non_numeric", "not UTF-8", record)
                    continue
            text = (value or "").strip()
            (json_indices if text[:1] in ("[", "{") else csv_indices).append(len(texts))
            texts.append(text)
            keys.append(key)
        lines = _Lines(self._source, "message", texts, None, keys)
        blocks, letters, _ = _json_blocks(lines.subset(json_indices), self._input_dim)
        csv_by_key: dict[str, list[int]] = {}
        for index in csv_indices:
            csv_by_key.setdefault(keys[index], []).append(index)
        for key, indices in csv_by_key.items():
            key_blocks, key_letters = _csv_blocks(lines.subset(indices), key, self._input_dim)
            blocks.extend(key_blocks)
            letters.extend(key_letters)
        yield from letters
        yield from _validated(self._source, blocks, self._input_dim, self._likelihood)


class DecodeRecords(beam.PTransform):
    """Messages -> `KeyedChunk`s (main output) and dead letters (tagged).

    An element is ``bytes`` (or ``str``), or a Kafka ``(key_bytes | None, value_bytes)`` pair.
    A value is a JSON array of numbers, a JSON object ``{"x": [...], "key": "k"}`` or one CSV
    line. The model key is the object's ``"key"``, else the message key, else
    ``default_key``. Kafka offsets are not known here, so dead letters carry no position.

    One Beam element per example would cost more than training it, so messages are buffered
    per window within a bundle and decoded together, up to :data:`CHUNK_ROWS` at a time; the
    rest is decoded when the bundle finishes (bundles are short in streaming). The outputs
    carry the latest timestamp of their messages (never earlier than any of them, so never
    behind the watermark) -- unlike ``beam.BatchElements``, which stamps a batch flushed at
    the end of a bundle with the end of the global window.

    Returns the ``DoOutputsTuple`` of the decoding ParDo: ``result[None]`` (the chunks) and
    ``result[DEAD_LETTER_TAG]``.
    """

    def __init__(
        self,
        input_dim: int,
        likelihood: str,
        default_key: str = "default",
        source: str = "records",
    ) -> None:
        super().__init__()
        check_likelihood(likelihood)
        self._fn = _DecodeRecordsFn(input_dim, likelihood, default_key, source)

    def expand(self, messages: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return messages | "DecodeBatches" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER_TAG)


class ValidateChunks(beam.DoFn):
    """``(key, numeric chunk)`` -> a `KeyedChunk` of its valid rows; dead letters tagged.

    For sources that produce arrays themselves (the data-set replay), so that their records
    pass the same checks as decoded ones. Positions are row indices within the chunk. Use as
    ``beam.ParDo(ValidateChunks(...)).with_outputs(DEAD_LETTER_TAG, main="chunks")``.
    """

    def __init__(self, input_dim: int, likelihood: str, source: str = "dataset") -> None:
        check_likelihood(likelihood)
        self._input_dim = input_dim
        self._likelihood = likelihood
        self._source = source

    def process(self, element: tuple[str, np.ndarray]) -> Iterator[Any]:
        key, chunk = element
        values = np.asarray(chunk)
        if values.dtype.kind not in "biuf":
            letter = DeadLetter(
                self._source,
                "non_numeric",
                f"chunk has dtype {values.dtype}, not numbers",
                record_locator("chunk", None, row_excerpt(values[:1])),
            )
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)
            return
        values = _as_rows(values)
        block = _Block(key, values, "chunk row", np.arange(len(values)))
        yield from _tagged(
            _validated(
                self._source, [block], self._input_dim, self._likelihood, keep_positions=False
            )
        )

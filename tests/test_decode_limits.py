"""What one file may expand to is bounded (--max-file-bytes), counted after decompression and
checked before allocating: a small archive or gzip'd file of zeros is one `too_large` dead
letter, never gigabytes of memory."""

from __future__ import annotations

import gzip
import io
import pathlib
import tracemalloc
import zipfile

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.ingest.dead_letter import DeadLetter
from pipeline.ingest.decode import KeyedChunk, decode_file
from pipeline.ingest.read import ReadExamples
from pipeline.jobs.options import AEVBOptions

D = 4
LIMIT = 8 * 2**20  # 8 MiB


def _decoded(name: str, data: bytes, max_bytes: int = LIMIT) -> tuple[list, int]:
    """(what decoding yields, the peak memory it allocated in bytes)."""
    tracemalloc.start()
    try:
        items = list(decode_file(name, data, D, "bernoulli", "default", max_bytes))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return items, peak


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _zeros_npz(rows: int) -> bytes:
    """An archive whose one array of rows x D float64 zeros compresses ~1000-fold."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("x.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header((rows, D)))
        zeros = bytes(2**20)
        for _ in range(rows * D * 8 // len(zeros)):
            member.write(zeros)
    return buffer.getvalue()


def test_an_archive_expanding_past_the_limit_is_refused_before_it_is_read() -> None:
    data = _zeros_npz(rows=2**21)  # 64 MiB of zeros in about 64 KB
    assert len(data) < LIMIT // 16
    items, peak = _decoded("bomb.npz", data)
    assert [(item.reason, item.detail) for item in items] == [
        ("too_large", f"the archive expands to {64 * 2**20 + 128:,} bytes, more than {LIMIT:,}")
    ]
    assert peak < 4 * 2**20


def test_a_forged_npy_header_is_refused_before_allocating() -> None:
    forged = _npy_header((10**9, D)) + bytes(64)  # promises 32 GB
    items, peak = _decoded("forged.npy", forged, max_bytes=2**40)
    assert [item.reason for item in items] == ["unparseable_file"]
    assert "promises 32,000,000,000 bytes" in items[0].detail
    items, _ = _decoded("forged.npy", forged)
    assert [item.reason for item in items] == ["too_large"]
    assert peak < 2**20


def test_a_gzip_bomb_is_refused_within_the_limit() -> None:
    data = gzip.compress(b"0,0,0,0\n" * (8 * 2**20), compresslevel=9)  # 64 MiB of text
    items, peak = _decoded("bomb.csv.gz", data)
    assert [item.reason for item in items] == ["too_large"]
    assert peak < 3 * LIMIT


def test_gzipped_files_decode_like_plain_ones() -> None:
    rows = np.random.default_rng(0).random((5, D))
    text = "\n".join(",".join(f"{v:.6f}" for v in row) for row in rows).encode()
    for name, data in (("a.csv.gz", gzip.compress(text)), ("a.CSV.GZ", gzip.compress(text))):
        items, _ = _decoded(name, data)
        assert [type(item) for item in items] == [KeyedChunk]
        np.testing.assert_allclose(items[0].rows, rows, atol=1e-6)
    items, _ = _decoded("a.csv.gz", gzip.compress(text)[:-20])
    assert [(item.reason, item.detail) for item in items] == [
        ("unparseable_file", "truncated gzip data")
    ]
    items, _ = _decoded("a.npy.gz", b"not gzip")
    assert isinstance(items[0], DeadLetter) and items[0].reason == "unparseable_file"


def test_a_plain_file_over_the_limit_is_one_dead_letter() -> None:
    items, _ = _decoded("big.csv", b"0,0,0,0\n" * 1000, max_bytes=7999)
    assert [(item.reason, item.detail) for item in items] == [
        ("too_large", "8,000 bytes, more than 7,999")
    ]


def test_the_flag_reaches_the_read_path(tmp_path: pathlib.Path) -> None:
    np.save(tmp_path / "small.npy", np.zeros((2, D)))
    np.save(tmp_path / "large.npy", np.zeros((200, D)))  # 6,528 bytes
    options = AEVBOptions(["--source", f"files:{tmp_path}/*.npy", "--max-file-bytes", "4096"])
    read = ReadExamples(options.source, D, "bernoulli", max_file_bytes=options.max_file_bytes)
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        chunks, letters = pipeline | read
        assert_that(chunks | beam.Map(len), equal_to([2]), label="Chunks")
        assert_that(
            letters | beam.Map(lambda letter: (pathlib.Path(letter.source).name, letter.reason)),
            equal_to([("large.npy", "too_large")]),
            label="DeadLetters",
        )

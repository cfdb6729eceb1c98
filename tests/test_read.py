"""The one read path of both jobs (pipeline.ingest.read): sources to keyed chunks + dead letters."""

from __future__ import annotations

import pathlib

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.ingest.read import DatasetReplay, KeyedChunk, ReadExamples


def _rows_with_positions(chunk: KeyedChunk) -> list[tuple]:
    positions = [None] * len(chunk) if chunk.positions is None else chunk.positions.tolist()
    return [
        (chunk.key, chunk.source, position, row)
        for position, row in zip(positions, chunk.rows.tolist(), strict=True)
    ]


def test_files_become_chunks_with_their_line_numbers_and_dead_letters(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "part.csv"
    path.write_text("a,b\n0,1\n0.5,oops\n1,0.25\n2,0\n")  # a header, a bad cell, out of support
    read = ReadExamples(f"files:{tmp_path}/*.csv", input_dim=2, likelihood="bernoulli")
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        chunks, letters = pipeline | read
        assert_that(
            chunks | beam.FlatMap(_rows_with_positions),
            equal_to(
                [
                    ("default", str(path), 2, [0.0, 1.0]),
                    ("default", str(path), 4, [1.0, 0.25]),
                ]
            ),
            label="Chunks",
        )
        assert_that(
            letters | beam.Map(lambda letter: (letter.reason, letter.position)),
            equal_to([("non_numeric", 3), ("out_of_support", 5)]),
            label="DeadLetters",
        )


def test_the_dataset_source_replays_a_split_and_names_it(tmp_path: pathlib.Path) -> None:
    from pipeline.ingest.datasets import load_dataset

    test_rows = load_dataset("mnist-5k").test
    replay = DatasetReplay("mnist-5k", split="test", epochs=1)
    read = ReadExamples("dataset", 784, "bernoulli", chunk_size=500, replay=replay)
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        chunks, letters = pipeline | read
        assert_that(
            chunks | "Sources" >> beam.Map(lambda c: f"{c.source} {c.positions}") | beam.Distinct(),
            equal_to(["dataset:mnist-5k/test None"]),
            label="Source",
        )
        assert_that(
            chunks | "Rows" >> beam.Map(len) | beam.CombineGlobally(sum),
            equal_to([len(test_rows)]),
            label="Rows",
        )
        assert_that(letters, equal_to([]), label="NoDeadLetters")


def test_an_unknown_split_or_source_is_refused() -> None:
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        DatasetReplay("mnist", split="validation")
    with pytest.raises(ValueError, match="must be one of"):
        ReadExamples("ftp://x", 2, "bernoulli")

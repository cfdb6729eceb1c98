"""The one read path of both jobs: a source, decoded and validated, in two outputs.

    source (dataset | files | kafka)
      -> decode and validate
      -> KeyedChunks of valid rows    (the main output)
      -> DeadLetters                  (every rejected record, with its reason)

`ReadExamples` is what `aevb train` and `aevb score` read with, so a record is accepted or
rejected the same way whichever job reads it. `parse_source` names the sources:

>>> ReadExamples("files:/data/in/*.npy", input_dim=784, likelihood="bernoulli").kind
'files'
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np

from pipeline.ingest.dead_letter import DEAD_LETTER_TAG
from pipeline.ingest.decode import (
    DEFAULT_MAX_FILE_BYTES,
    DecodeFiles,
    DecodeRecords,
    KeyedChunk,
    ValidateChunks,
)
from pipeline.ingest.scenarios import ScenarioSpec
from pipeline.ingest.sources import (
    DEFAULT_SETTLE_SECONDS,
    ReplayDataset,
    kafka_source,
    parse_source,
    read_files,
)

__all__ = ["DatasetReplay", "KeyedChunk", "ReadExamples"]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it may hold an array
class DatasetReplay:
    """What the ``dataset`` source replays (see `pipeline.ingest.sources.ReplayDataset`).

    ``split`` "train" replays the training split, loaded on the workers; "test" the test
    split, loaded when the pipeline is built and pickled into it. ``skip`` resumes a
    replay after that many examples; ``scenario`` replays a drift scenario instead.
    """

    dataset: str = "mnist"
    data_dir: str | None = None
    fallback: str | None = None
    split: str = "train"
    epochs: int | None = None
    examples_per_second: float | None = None
    seed: int = 0
    skip: int = 0
    scenario: ScenarioSpec | None = None

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")

    @property
    def source(self) -> str:
        """The ``source`` of this replay's dead letters and chunks."""
        return f"dataset:{self.dataset}/{self.split}"

    def test_rows(self) -> np.ndarray | None:
        if self.split != "test":
            return None
        from pipeline.ingest.datasets import load_dataset

        return load_dataset(self.dataset, self.data_dir, fallback=self.fallback).test


class ReadExamples(beam.PTransform):
    """PBegin -> ``(KeyedChunks, DeadLetters)``: the source ``source`` names, decoded.

    Args:
        source: ``dataset``, ``files:GLOB`` or ``kafka:BOOTSTRAP/TOPIC``.
        input_dim, likelihood: what a valid row is (`pipeline.ingest.validation`).
        model_key: the key of records that carry none.
        streaming: an unbounded job: files are watched, the replay checkpoints often.
        max_examples: read at most this many (the dataset and Kafka sources).
        chunk_size: examples per element of the dataset source.
        poll_interval_seconds: how often a watched glob is listed.
        settle_seconds: how long a watched file must stay unmodified before it is read.
        max_file_bytes: what one file may hold, or expand to (`decode_file`).
        replay: what the dataset source replays.
        job_id: the sources stop when `pipeline.ingest.lifecycle.request_stop(job_id)`.
        kafka_expansion_service: the Kafka source's expansion service (`kafka_source`).
    """

    def __init__(
        self,
        source: str,
        input_dim: int,
        likelihood: str,
        *,
        model_key: str = "default",
        streaming: bool = False,
        max_examples: int | None = None,
        chunk_size: int = 1000,
        poll_interval_seconds: float = 1.0,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        replay: DatasetReplay = DatasetReplay(),
        job_id: str | None = None,
        kafka_expansion_service: str | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.argument = parse_source(source)
        self.source = source
        self.input_dim = input_dim
        self.likelihood = likelihood  # checked by the decoding DoFns, at construction
        self.model_key = model_key
        self.streaming = streaming
        self.max_examples = max_examples
        self.chunk_size = chunk_size
        self.poll_interval_seconds = poll_interval_seconds
        self.settle_seconds = settle_seconds
        self.max_file_bytes = max_file_bytes
        self.replay = replay
        self.job_id = job_id
        self.kafka_expansion_service = kafka_expansion_service

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[beam.PCollection, beam.PCollection]:
        if self.kind == "files":
            decoded = (
                pbegin
                | "ReadFiles"
                >> read_files(
                    self.argument,
                    streaming=self.streaming,
                    job_id=self.job_id,
                    poll_interval_seconds=self.poll_interval_seconds,
                    settle_seconds=self.settle_seconds,
                )
                | "Decode"
                >> beam.ParDo(
                    DecodeFiles(
                        self.input_dim, self.likelihood, self.model_key, self.max_file_bytes
                    )
                ).with_outputs(DEAD_LETTER_TAG, main="chunks")
            )
            return decoded.chunks, decoded[DEAD_LETTER_TAG]
        if self.kind == "kafka":
            decoded = (
                pbegin
                | "ReadKafka"
                >> kafka_source(
                    self.argument,
                    max_examples=self.max_examples,
                    expansion_service=self.kafka_expansion_service,
                )
                | "Decode"
                >> DecodeRecords(
                    self.input_dim, self.likelihood, self.model_key, source=self.source
                )
            )
            return decoded[None], decoded[DEAD_LETTER_TAG]
        replay = self.replay
        decoded = (
            pbegin
            | "ReplayDataset"
            >> ReplayDataset(
                replay.dataset,
                data=replay.test_rows(),
                data_dir=replay.data_dir,
                fallback=replay.fallback,
                model_key=self.model_key,
                chunk_size=self.chunk_size,
                # Counted from the start of the replay, which `skip` resumes.
                max_examples=self.max_examples,
                epochs=replay.epochs,
                streaming=self.streaming,
                examples_per_second=replay.examples_per_second,
                seed=replay.seed,
                skip=replay.skip,
                job_id=self.job_id,
                scenario=replay.scenario,
            )
            | "Validate"
            >> beam.ParDo(
                ValidateChunks(self.input_dim, self.likelihood, source=replay.source)
            ).with_outputs(DEAD_LETTER_TAG, main="chunks")
        )
        return decoded.chunks, decoded[DEAD_LETTER_TAG]

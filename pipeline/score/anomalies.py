"""Anomaly flags: a score above a fixed threshold, or above a quantile of recent scores.

`FlagAnomalies` turns RunInference's `PredictionResult`s into the scoring job's output
dicts: ``key``, ``source``, ``position``, ``score`` (the negative bound in nats),
``latent_mean``, ``model_version``, ``anomaly`` (null while a quantile threshold has too few
recent scores), ``threshold`` and ``scored_unix_seconds``.

>>> flags = _FlagAnomaliesFn(Threshold(quantile=0.5, window=2)); flags.setup()
>>> [flags._limit("k", s) for s in (1.0, 3.0, 10.0)]
[None, None, 2.0]
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from vae.snapshot_format import version_number

__all__ = ["FlagAnomalies", "Threshold"]

_DECIMALS = 6  # of scores and latent means in the output: float32 has ~7 significant digits


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A fixed `value`, or the `quantile` of the last `window` scores of a key (or none)."""

    value: float | None = None
    quantile: float | None = None
    window: int = 1000

    def __post_init__(self) -> None:
        if self.value is not None and self.quantile is not None:
            raise ValueError("give a fixed threshold or a threshold quantile, not both")
        if self.quantile is not None and not 0 < self.quantile < 1:
            raise ValueError(f"threshold quantile must be between 0 and 1, got {self.quantile}")
        if self.window < 1:
            raise ValueError(f"threshold window must be positive, got {self.window}")


class _FlagAnomaliesFn(beam.DoFn):
    """PredictionResult per record -> the output dict, with the anomaly flag.

    The recent scores of each key are kept in the DoFn instance (per worker thread), so
    with several workers each judges against the scores it saw itself.
    """

    def __init__(self, threshold: Threshold) -> None:
        self._threshold = threshold

    def setup(self) -> None:
        self._recent: dict[str, collections.deque] = {}

    def process(self, result: PredictionResult) -> Iterator[dict[str, Any]]:
        key, source, position = result.example
        score = float(result.inference["score"])
        limit = self._limit(key, score)
        version_dir = pathlib.Path(result.model_id)
        yield {
            "key": key,
            "source": source,
            "position": position,
            "score": round(score, _DECIMALS),
            "latent_mean": np.round(
                np.asarray(result.inference["latent_mean"], np.float64), _DECIMALS
            ).tolist(),
            "model_version": version_number(version_dir),
            "anomaly": None if limit is None else bool(score > limit),
            "threshold": None if limit is None else round(float(limit), _DECIMALS),
            "scored_unix_seconds": round(time.time(), 3),
        }

    def _limit(self, key: str, score: float) -> float | None:
        """The threshold this score is judged by (before it joins the recent scores)."""
        if self._threshold.value is not None:
            return self._threshold.value
        if self._threshold.quantile is None:
            return None
        recent = self._recent.setdefault(key, collections.deque(maxlen=self._threshold.window))
        limit = None
        if len(recent) == recent.maxlen:
            limit = float(
                np.quantile(np.fromiter(recent, float, len(recent)), self._threshold.quantile)
            )
        recent.append(score)
        return limit


class FlagAnomalies(beam.PTransform):
    """`PredictionResult`s of `SnapshotModelHandler` -> the output dicts, flagged."""

    def __init__(self, threshold: Threshold) -> None:
        super().__init__()
        self._threshold = threshold

    def expand(self, results: beam.PCollection) -> beam.PCollection:
        return results | "Flag" >> beam.ParDo(_FlagAnomaliesFn(self._threshold))

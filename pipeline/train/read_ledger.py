"""Which records of which files a model has trained on: the read position of a key.

A restarted job reads its files again; the key's ledger, saved with each of its checkpoints,
says which of their records the restored model has already learned from, and those are
dropped before training. A file is known by its path and content (`origin`, see
`pipeline.ingest.decode.content_origin`), so the same name with new content is a new file.
Positions
are the records' places in their file, kept as sorted half-open intervals: a file trained
in order is one interval, whatever its length.

>>> ledger = ReadLedger()
>>> ledger.add("f1", np.array([0, 1, 2, 5]))
>>> ledger.to_dict()
{'f1': [[0, 3], [5, 6]]}
>>> ledger.unread("f1", np.array([1, 3, 4, 5, 6])).tolist()
[False, True, True, False, True]
>>> ReadLedger.from_dict(ledger.to_dict()) == ledger
True
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["ReadLedger"]


class ReadLedger:
    """Trained positions per file origin, as merged intervals; thread-safe."""

    def __init__(self, intervals: dict[str, list[tuple[int, int]]] | None = None) -> None:
        self._intervals = {origin: list(spans) for origin, spans in (intervals or {}).items()}
        self._lock = threading.Lock()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReadLedger) and self.to_dict() == other.to_dict()

    def __len__(self) -> int:
        return len(self._intervals)

    def add(self, origin: str, positions: np.ndarray) -> None:
        """Records that the records at `positions` of `origin` were trained on."""
        if len(positions) == 0:
            return
        with self._lock:
            spans = self._intervals.get(origin, []) + _runs(np.unique(positions))
            self._intervals[origin] = _merged(spans)

    def unread(self, origin: str, positions: np.ndarray) -> np.ndarray:
        """A boolean mask: which of `positions` of `origin` were not trained on yet."""
        with self._lock:
            spans = self._intervals.get(origin)
            if not spans:
                return np.ones(len(positions), dtype=bool)
            starts = np.fromiter((start for start, _ in spans), np.int64, len(spans))
            ends = np.fromiter((end for _, end in spans), np.int64, len(spans))
        # The span that starts at or before each position, and whether it reaches past it.
        index = np.searchsorted(starts, positions, side="right") - 1
        inside = (index >= 0) & (positions < ends[np.maximum(index, 0)])
        return ~inside

    def to_dict(self) -> dict[str, list[list[int]]]:
        with self._lock:
            return {
                origin: [[start, end] for start, end in spans]
                for origin, spans in sorted(self._intervals.items())
            }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReadLedger:
        return cls(
            {origin: [(int(a), int(b)) for a, b in spans] for origin, spans in values.items()}
        )


def _runs(sorted_positions: np.ndarray) -> list[tuple[int, int]]:
    """Half-open intervals covering exactly these sorted, distinct positions."""
    breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
    return [
        (int(run[0]), int(run[-1]) + 1) for run in np.split(sorted_positions, breaks) if len(run)
    ]


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

"""Dead letters: records the pipeline rejected, with enough context to find and fix them.

A bad record must never stop an unbounded job, and it must never vanish silently either:
decoding and validation route it to the ``DEAD_LETTER_TAG`` output as a :class:`DeadLetter`,
which the jobs write to ``RUN_DIR/dead_letter/`` and count
(`pipeline.outputs.dead_letters.WriteDeadLetters`).

``position`` is a 1-based line number for text formats (CSV, JSON lines), a 0-based row or
record index for binary formats (``.npy``, ``.npz``, ``.tfrecord``) and for chunks, and
None when unknown (e.g. Kafka messages read without metadata). ``record`` spells it out
("line 7: ...") together with an excerpt of the record.

>>> letter = DeadLetter("in/a.csv", "non_numeric", "cell 'x' is not a number",
...                     record_locator("line", 7, "0.5,x,1"), position=7)
>>> letter.record
'line 7: 0.5,x,1'
>>> import json; json.loads(letter.to_json())["reason"]
'non_numeric'
>>> len(excerpt("9" * 1000)) <= EXCERPT_CHARS
True
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

__all__ = [
    "DEAD_LETTER_TAG",
    "EXCERPT_CHARS",
    "REASONS",
    "DeadLetter",
    "excerpt",
    "record_locator",
    "row_excerpt",
]

REASONS: tuple[str, ...] = (
    "wrong_width",
    "non_numeric",
    "non_finite",
    "out_of_support",
    "unparseable_file",
    "pickled_object",
    "unsupported_format",
    "invalid_key",
    "too_large",
    "no_model",
)
DEAD_LETTER_TAG = "dead_letter"
EXCERPT_CHARS = 200
# A row excerpt never needs more values than fit in EXCERPT_CHARS; formatting all 784
# pixels of an image only to cut them off would be wasted work.
_EXCERPT_VALUES = 64


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One rejected record (or a whole rejected file), see the module docstring."""

    source: str
    reason: str
    detail: str
    record: str
    position: int | None = None
    # The file it came from, path and content (`pipeline.ingest.decode.content_origin`),
    # so that a restarted job that reads the file again writes none of its letters twice.
    origin: str | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {self.reason!r}; one of {REASONS}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, marked with '...' when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def row_excerpt(row: np.ndarray) -> str:
    """A short text form of one row of numbers (or of anything array-like)."""
    values = np.asarray(row).reshape(-1)
    # Six significant digits: float32 values printed in full (0.10000000149011612) are noise.
    text = ",".join(
        f"{v:.6g}" if isinstance(v, float) else str(v) for v in values[:_EXCERPT_VALUES].tolist()
    )
    if values.size > _EXCERPT_VALUES:
        text += ",..."
    return excerpt(text)


def record_locator(unit: str, position: int | None, text: str) -> str:
    """The ``record`` field: where the record is ("line 7") and an excerpt of it."""
    where = unit if position is None else f"{unit} {position}"
    return f"{where}: {excerpt(text)}"

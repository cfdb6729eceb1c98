"""Training records: what the trainer emits for every minibatch it processed.

A record is the test-then-train measurement of one minibatch of one model key, the unit
that metrics, drift detection, progress logs and plots consume downstream.

>>> record = TrainingRecord(key="default", step=3, examples_seen=300, batch_size=100,
...     elbo=-120.5, reconstruction_log_likelihood=-100.0, kl=20.5, applied=True,
...     event_time=0.0, processing_time=1.0)
>>> TrainingRecord.from_dict(record.to_dict()) == record
True
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """Averages over one minibatch, measured before the update (nats per example).

    `elbo_per_example` keeps the individual bounds for histograms and drift detectors; it is
    left out of `to_dict` (progress logs want one small line per step).
    """

    key: str
    step: int
    examples_seen: int
    batch_size: int
    elbo: float
    reconstruction_log_likelihood: float
    kl: float
    applied: bool
    event_time: float
    processing_time: float
    wall_seconds: float = 0.0
    step_seconds: float = 0.0
    elbo_per_example: tuple[float, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        del values["elbo_per_example"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingRecord:
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

"""A memory of regimes per model key: `--regime-memory N`.

Streams come back: day and night, a machine's modes, a tenant's seasons. Without a memory a
returning regime is learned again from wherever the model drifted to. With one, each drift
detection keeps the model of the distribution that just ended -- its parameters and
optimiser state from before the change -- and for a short while
(`WINDOW_MINIBATCHES`, the detecting minibatch included) scores the new minibatches under
every stored regime, a forward pass each. A stored regime has returned when, on average over
at least `MIN_MINIBATCHES`, it explains them better by a clear margin (`MARGIN_NOISE` times
the drift detector's learned minibatch noise) than both the current model and the model the
detection ended, and about as well as it explained its own data (within `RETURN_NOISE` noise
units of its level when it ended): then the key switches to it and keeps learning from
there, and the model the detection ended takes the stored one's place. Against the current
model alone, an older regime would win whenever the current model is briefly worse -- after
`--adaptation reset`'s first large steps, measured: four switches back to less rotated
models during a slow rotation, which undid the adaptation. The level test keeps a merely
less bad regime from being taken for a returning one -- and overwritten by learning a new
distribution. A window that ends without a switch
stores the old model as a regime of its own, and the current one is counted as a new regime.
A detection the model's own instability caused (`pipeline.train.instability`) opens no
window: the key rolls back to its copy from before (`roll_back`, a switch of kind
"rollback", to the same regime).

"Before the change": the model at the detection has already learned from the minibatches
the detector needed, and one minibatch of a very different distribution moves it far
(measured on MNIST after 4*10^4 examples: a single step on inverted digits took the plain
digits' bound from -163 to -205 nats). So the memory keeps two copies of the trainer's
state, refreshed in turn every `LAG_MINIBATCHES`, and stores the older one, taken 10 to 20
minibatches before the detection -- two models more in memory per key.

The library holds at most `capacity` regimes: when full, the one least recently active is
dropped. Its regimes are arrays by the trainer's variable paths (`vae.checkpoint_writer`):
the model's parameters and the optimiser's state; the counters and the random generator
stay with the key. `state` and `arrays` go into the session's checkpoint.

>>> import numpy as np, vae
>>> trainer = vae.Trainer(vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8, batch_size=2))
>>> memory = RegimeMemory(trainer, capacity=2)
>>> memory.open_window(examples_seen=0)          # a detection: keep the model it ended
>>> for _ in range(WINDOW_MINIBATCHES):          # nothing stored yet to switch to
...     assert memory.consider(np.eye(4, dtype=np.float32)[:2], -3.0, 1.0, 2) is None
>>> memory.active, [regime.id for regime in memory.stored]
(1, [0])
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np

import vae

__all__ = [
    "MARGIN_NOISE",
    "MIN_MINIBATCHES",
    "RETURN_NOISE",
    "WINDOW_MINIBATCHES",
    "RegimeMemory",
    "Switch",
]

# Minibatches after a detection during which the stored regimes are scored, the detecting
# one included: 2,000 examples at M = 100.
WINDOW_MINIBATCHES = 20
# A switch needs this many minibatches scored, and a stored regime ahead of the current
# model by MARGIN_NOISE noise units on their average: the two bounds are of the same
# examples, so the difference is far less noisy than either (a regime that really returns
# is ahead by hundreds of nats).
MIN_MINIBATCHES = 2
MARGIN_NOISE = 3.0
RETURN_NOISE = 5.0
# A regime's level: the median bound of its last minibatches.
LEVEL_MINIBATCHES = 20
# How often a copy of the state is taken, in minibatches: the stored one is 1-2 times this
# old, older than the change for detections within LAG_MINIBATCHES of it (Page-Hinkley's on
# abrupt shifts take 1-4; ADWIN's on small ones up to ~20, whose steps move a model little).
LAG_MINIBATCHES = 10
# The trainer's own counters and random state: they stay with the key, not the regime.
_KEY_VARIABLES = ("trainer/_step", "trainer/_examples_seen", "trainer/_skipped_steps")
_KEY_PREFIXES = ("trainer/rng/",)


@dataclasses.dataclass
class Regime:
    """A stored model: its arrays by variable path, its level (the median bound of its
    last minibatches, nats per example) and when it was last the active one."""

    id: int
    arrays: dict[str, np.ndarray]
    level: float
    last_active_examples: int


@dataclasses.dataclass
class _Copy:
    """The trainer's state at some minibatch, and its level then."""

    arrays: dict[str, np.ndarray]
    level: float


@dataclasses.dataclass(frozen=True)
class Switch:
    """The key switched models -- back to a stored regime, or rolled back to its copy from
    before an instability: from which regime, to which, where, and why."""

    key: str
    from_regime: int
    to_regime: int
    examples_seen: int
    minibatches_scored: int
    advantage_nats: float  # the regime's mean bound minus the current model's, per example
    margin_nats: float
    # "return": a stored regime came back; "rollback": the model went back to its copy from
    # before a detection its own instability caused (a burst of large steps), not the data.
    kind: str = "return"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RegimeMemory:
    """The stored regimes of one key's trainer, and the scoring after each detection."""

    def __init__(self, trainer: vae.Trainer, capacity: int, key: str = "") -> None:
        if capacity < 1:
            raise ValueError(f"a regime memory holds at least one regime, not {capacity}")
        self.trainer = trainer
        self.capacity = capacity
        self.key = key
        self.active = 0  # the id of the regime the trainer holds
        self.stored: list[Regime] = []
        self._next_id = 1
        # Imports TensorFlow: here, so that importing this module (its constants, for flag
        # parsers and benchmarks' command lines) does not.
        from vae.checkpoint_writer import variables_by_path

        variables = variables_by_path(trainer.checkpoint())
        self._variables = {
            path: variable
            for path, variable in variables.items()
            if path not in _KEY_VARIABLES and not path.startswith(_KEY_PREFIXES)
        }
        paths = {id(variable): path for path, variable in variables.items()}
        self._parameter_paths = [paths[id(p)] for p in trainer.model.parameters()]
        self._recent: collections.deque[float] = collections.deque(maxlen=LEVEL_MINIBATCHES)
        # Copies of the state, older first, and the minibatches observed since the last.
        self._copies: list[_Copy] = []
        self._since_copy = 0
        # After a detection: the model it ended, and the scores so far.
        self._pending: Regime | None = None
        self._scored = 0
        self._current_sum = 0.0
        self._regime_sums: dict[int, float] = {}

    @property
    def scoring(self) -> bool:
        """Whether a detection's window is open."""
        return self._pending is not None

    def observe(self, bound: float) -> None:
        """After each applied minibatch: its mean test-then-train bound under the current
        model (the regime's level); every `LAG_MINIBATCHES`, a copy of the state."""
        self._recent.append(bound)
        self._since_copy += 1
        if self._since_copy >= LAG_MINIBATCHES:
            level = statistics.median(self._recent)
            self._copies = [*self._copies[-1:], _Copy(self._current_arrays(), level)]
            self._since_copy = 0

    def open_window(self, examples_seen: int) -> None:
        """A detection: keeps the trainer's model as the regime that ended, and scores the
        stored ones on the minibatches to come. A window already open is closed first."""
        if self._pending is not None:
            self._close_window(examples_seen)
        if self._copies:
            before = self._copies[0]  # the older copy: from before the change
        else:  # a detection within LAG_MINIBATCHES of the start
            level = statistics.median(self._recent) if self._recent else math.nan
            before = _Copy(self._current_arrays(), level)
        self._pending = Regime(self.active, before.arrays, before.level, examples_seen)
        self._scored, self._current_sum = 0, 0.0
        self._regime_sums = {regime.id: 0.0 for regime in self._candidates()}

    def _candidates(self) -> list[Regime]:
        """What a window scores: the stored regimes, and the model the detection ended (its
        id: the active one's), which a returning regime must beat too."""
        return [*self.stored, self._pending]

    def consider(
        self, batch: np.ndarray, current_bound: float, noise_scale: float, examples_seen: int
    ) -> Switch | None:
        """Scores `batch` under each stored regime against `current_bound` (the current
        model's mean test-then-train bound of it) while a window is open; switches the
        trainer to a regime ahead by the margin and returns the switch."""
        if self._pending is None:
            return None
        self._scored += 1
        self._current_sum += current_bound
        # Nothing stored, nothing to switch to: the window only waits to store the ended model.
        for regime in self._candidates() if self.stored else []:
            self._regime_sums[regime.id] += self._score(regime, batch)
        best = max(self.stored, key=lambda r: self._regime_sums[r.id], default=None)
        if best is not None and self._scored >= MIN_MINIBATCHES:
            mean = self._regime_sums[best.id] / self._scored
            rival = max(self._current_sum, self._regime_sums[self._pending.id])
            advantage = mean - rival / self._scored
            margin = MARGIN_NOISE * noise_scale
            as_before = mean >= best.level - RETURN_NOISE * noise_scale
            if advantage > margin and as_before:
                return self._switch(best, examples_seen, advantage, margin)
        if self._scored >= WINDOW_MINIBATCHES:
            self._close_window(examples_seen)
        return None

    def roll_back(
        self, examples_seen: int, evidence_nats: float, margin_nats: float
    ) -> Switch | None:
        """Puts the older copy of the state back: a detection the model's own instability
        caused (`pipeline.train.instability`, whose `evidence_nats` and `margin_nats` the
        switch reports); None without a copy yet."""
        if not self._copies:
            return None
        before = self._copies[0]
        if self._pending is not None:  # an open window is about another change: closed
            self._close_window(examples_seen)
        self._pending = Regime(self.active, before.arrays, before.level, examples_seen)
        self._scored = 0
        return self._switch(self._pending, examples_seen, evidence_nats, margin_nats)

    def _switch(
        self, regime: Regime, examples_seen: int, advantage: float, margin: float
    ) -> Switch:
        for path, array in regime.arrays.items():
            self._variables[path].assign(array)
        # The copies and levels so far are of the model left behind.
        self._copies, self._since_copy = [], 0
        self._recent.clear()
        pending, self._pending = self._pending, None
        kind = "rollback" if regime is pending else "return"
        if kind == "return":  # the model the detection ended takes the regime's place
            self.stored[self.stored.index(regime)] = pending
        switch = Switch(
            self.key,
            self.active,
            regime.id,
            examples_seen,
            self._scored,
            advantage,
            margin,
            kind,
        )
        self.active = regime.id
        return switch

    def _close_window(self, examples_seen: int) -> None:
        """No stored regime explained the new data: the old model is stored as a regime of
        its own (dropping the least recently active when full) and the current one is new."""
        pending, self._pending = self._pending, None
        if len(self.stored) >= self.capacity:
            oldest = min(self.stored, key=lambda r: r.last_active_examples)
            self.stored.remove(oldest)
        pending.last_active_examples = examples_seen
        self.stored.append(pending)
        self.active, self._next_id = self._next_id, self._next_id + 1

    def _current_arrays(self) -> dict[str, np.ndarray]:
        return {path: variable.numpy() for path, variable in self._variables.items()}

    def _score(self, regime: Regime, batch: np.ndarray) -> float:
        """The mean bound of `batch` under the regime's parameters (a forward pass)."""
        config = self.trainer.config
        parameters = [regime.arrays[path] for path in self._parameter_paths]
        return float(vae.bound_with_parameters(config, parameters, batch, config.seed).mean())

    def state(self) -> dict[str, Any]:
        """The library's bookkeeping, JSON-able (its arrays: `arrays`)."""
        regimes = [
            {"id": r.id, "level": r.level, "last_active_examples": r.last_active_examples}
            for r in [*self.stored, *([self._pending] if self._pending else [])]
        ]
        return {
            "capacity": self.capacity,
            "active": self.active,
            "next_id": self._next_id,
            "stored": regimes[: len(self.stored)],
            "pending": regimes[len(self.stored)] if self._pending else None,
            "recent": list(self._recent),
            "copy_levels": [copy.level for copy in self._copies],
            "since_copy": self._since_copy,
            "scored": self._scored,
            "current_sum": self._current_sum,
            "regime_sums": {str(k): v for k, v in self._regime_sums.items()},
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Every stored (and pending) regime's arrays, named `regimes/<id>/<path>`, and the
        copies of the state, `regimes/copy-<i>/<path>`."""
        named = {}
        for regime in [*self.stored, *([self._pending] if self._pending else [])]:
            for path, array in regime.arrays.items():
                named[f"regimes/{regime.id}/{path}"] = array
        for index, copy in enumerate(self._copies):
            for path, array in copy.arrays.items():
                named[f"regimes/copy-{index}/{path}"] = array
        return named

    def load(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Takes up what `state` and `arrays` saved (a restored checkpoint)."""

        def regime(entry: Mapping[str, Any]) -> Regime:
            prefix = f"regimes/{entry['id']}/"
            found = {path: arrays[prefix + path] for path in self._variables}
            return Regime(entry["id"], found, entry["level"], entry["last_active_examples"])

        self.active, self._next_id = state["active"], state["next_id"]
        self.stored = [regime(entry) for entry in state["stored"]]
        # A smaller --regime-memory than the run that saved it: keep the most recent.
        self.stored.sort(key=lambda r: r.last_active_examples)
        del self.stored[: max(0, len(self.stored) - self.capacity)]
        self._pending = regime(state["pending"]) if state["pending"] else None
        self._recent.extend(state["recent"])
        self._copies = [
            _Copy({path: arrays[f"regimes/copy-{i}/{path}"] for path in self._variables}, level)
            for i, level in enumerate(state["copy_levels"])
        ]
        self._since_copy = state["since_copy"]
        self._scored, self._current_sum = state["scored"], state["current_sum"]
        self._regime_sums = {int(k): v for k, v in state["regime_sums"].items()}
        if self._pending is not None:
            self._regime_sums = {r.id: self._regime_sums[r.id] for r in self._candidates()}

"""Non-stationary streams made from a data set: deterministic drift scenarios.

A scenario is a schedule of phases, each a number of examples drawn (in reshuffled passes)
from its own pool: some digit classes, a data set or its inverse, images rotated by an angle
that grows. `examples(start, count)` returns any stretch of the stream directly, so a source
can jump to the chunk it needs and a resumed job continues the same stream.

- `class-incremental`: digit classes by phase, e.g. "0-4,5-9" or "0,1,2,...";
- `gradual`: images rotated by an angle growing from 0 to `max_angle` degrees over `span`
  examples starting at `start`;
- `abrupt`: a switch between data sets of one shape (mnist, binarized-mnist, inverted-mnist);
- `recurring`: the same phases coming back in a cycle.

>>> import numpy as np
>>> images = np.random.default_rng(0).random((40, 4)).astype(np.float32)
>>> labels = np.repeat(np.arange(10), 4)
>>> scenario = class_incremental(images, labels, "0-4,5-9", phase_examples=30)
>>> [(p.start, p.name) for p in scenario.phases(60)]
[(0, 'digits 0-4'), (30, 'digits 5-9')]
>>> first, second = scenario.examples(0, 30), scenario.examples(30, 30)
>>> bool(np.isin(first, images[:20]).all() and np.isin(second, images[20:]).all())
True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

SCENARIOS: tuple[str, ...] = ("class-incremental", "gradual", "abrupt", "recurring")
ANGLE_STEP = 0.5


@dataclasses.dataclass(frozen=True)
class Phase:
    """Examples [start, end) of the stream come from this phase (end None: for ever)."""

    index: int
    start: int
    end: int | None
    name: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _PhaseSpec:
    name: str
    pool: np.ndarray
    transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    test_pool: np.ndarray | None = None


class Scenario:
    """A stream of phases; `cycle=True` repeats the phases for ever."""

    def __init__(
        self,
        kind: str,
        phases: Sequence[_PhaseSpec],
        phase_examples: int,
        seed: int = 0,
        cycle: bool = False,
    ) -> None:
        if phase_examples < 1:
            raise ValueError(f"phase_examples must be positive, got {phase_examples}")
        if not phases or any(len(spec.pool) == 0 for spec in phases):
            raise ValueError("every phase needs at least one example")
        self.kind = kind
        self._specs = list(phases)
        self.phase_examples = phase_examples
        self.seed = seed
        self.cycle = cycle
        self.input_dim = self._specs[0].pool.shape[1]

    def phases(self, total_examples: int) -> list[Phase]:
        """The schedule up to `total_examples` (the last phase open-ended if not cycling)."""
        phases, start, index = [], 0, 0
        while start < total_examples:
            spec_index = self._spec_index(index)
            if spec_index is None:
                break
            last = not self.cycle and spec_index == len(self._specs) - 1
            end = None if last else start + self.phase_examples
            phases.append(Phase(index, start, end, self._specs[spec_index].name))
            if end is None:
                break
            start, index = end, index + 1
        return phases

    def examples(self, start: int, count: int) -> np.ndarray:
        """Examples [start, start + count) of the stream, float32 [count, D]."""
        positions = np.arange(start, start + count)
        phase_indices = positions // self.phase_examples
        out = np.empty((count, self.input_dim), np.float32)
        for phase_index in np.unique(phase_indices).tolist():
            selected = phase_indices == phase_index
            spec_index = self._spec_index(phase_index)
            if spec_index is None:
                # Past the end of a schedule that does not cycle: its last phase goes on.
                spec_index = len(self._specs) - 1
                phase_index = spec_index
            spec = self._specs[spec_index]
            offsets = positions[selected] - phase_index * self.phase_examples
            rows = self._draw(phase_index, spec, offsets)
            if spec.transform is not None:
                rows = spec.transform(rows, positions[selected])
            out[selected] = rows
        return out

    def test_data(self, phase_index: int) -> np.ndarray | None:
        """Held-out examples of a phase (for forgetting), if the scenario has them."""
        spec_index = self._spec_index(phase_index)
        if spec_index is None:
            spec_index = len(self._specs) - 1
        return self._specs[spec_index].test_pool

    def _spec_index(self, phase_index: int) -> int | None:
        if self.cycle:
            return phase_index % len(self._specs)
        return phase_index if phase_index < len(self._specs) else None

    def _draw(self, stream_phase: int, spec: _PhaseSpec, offsets: np.ndarray) -> np.ndarray:
        size = len(spec.pool)
        passes, within = np.divmod(offsets, size)
        rows = np.empty((len(offsets), self.input_dim), np.float32)
        for number in np.unique(passes):
            selected = passes == number
            order = _permutation(self.seed, stream_phase, int(number), size)
            rows[selected] = spec.pool[order[within[selected]]]
        return rows


@functools.lru_cache(maxsize=64)
def _permutation(seed: int, phase: int, number: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, phase, number]).permutation(size)


def parse_classes(spec: str) -> list[list[int]]:
    """'0-4,5-9' -> [[0..4], [5..9]]; '0,1,2' -> [[0], [1], [2]]."""
    groups = []
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"bad class group {part!r}: use digits like '0-4' or '7'") from None
        if not 0 <= first <= last <= 9:
            raise ValueError(f"bad class group {part!r}: classes are 0-9")
        groups.append(list(range(first, last + 1)))
    return groups


def class_incremental(
    images: np.ndarray,
    labels: np.ndarray,
    classes: str = "0-4,5-9",
    phase_examples: int = 200_000,
    seed: int = 0,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    cycle: bool = False,
) -> Scenario:
    specs = []
    for group in parse_classes(classes):
        test_pool = None
        if test_images is not None and test_labels is not None:
            test_pool = test_images[np.isin(test_labels, group)]
        name = f"digits {group[0]}-{group[-1]}" if len(group) > 1 else f"digit {group[0]}"
        specs.append(_PhaseSpec(name, images[np.isin(labels, group)], None, test_pool))
    kind = "recurring" if cycle else "class-incremental"
    return Scenario(kind, specs, phase_examples, seed, cycle)


def abrupt(
    pools: dict[str, np.ndarray],
    phase_examples: int = 200_000,
    seed: int = 0,
    test_pools: dict[str, np.ndarray] | None = None,
    cycle: bool = False,
) -> Scenario:
    """Phases in the order of `pools` (data sets of one shape), optionally cycling."""
    specs = [
        _PhaseSpec(name, pool, None, (test_pools or {}).get(name)) for name, pool in pools.items()
    ]
    return Scenario("recurring" if cycle else "abrupt", specs, phase_examples, seed, cycle)


def gradual_rotation(
    images: np.ndarray,
    image_shape: tuple[int, int],
    start: int = 100_000,
    span: int = 200_000,
    max_angle: float = 90.0,
    seed: int = 0,
    test_images: np.ndarray | None = None,
) -> Scenario:
    """One pool; the angle is 0 before `start`, grows linearly over `span`, then stays."""

    def rotate(rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        angles = max_angle * np.clip((positions - start) / span, 0.0, 1.0)
        return rotate_images(rows, image_shape, angles)

    return _GradualScenario(
        [_PhaseSpec(f"rotating to {max_angle:g} degrees", images, rotate, test_images)],
        phase_examples=start + span,
        seed=seed,
        start=start,
        span=span,
        max_angle=max_angle,
    )


class _GradualScenario(Scenario):
    """One pool throughout; its schedule names the stretch before, during and after."""

    def __init__(self, specs, phase_examples, seed, start, span, max_angle) -> None:
        super().__init__("gradual", specs, phase_examples, seed)
        self._bounds = (start, span, max_angle)

    def phases(self, total_examples: int) -> list[Phase]:
        start, span, max_angle = self._bounds
        schedule = [
            Phase(0, 0, start, "upright"),
            Phase(1, start, start + span, f"rotating 0 to {max_angle:g} degrees"),
            Phase(2, start + span, None, f"rotated {max_angle:g} degrees"),
        ]
        return [phase for phase in schedule if phase.start < total_examples]

    def examples(self, start: int, count: int) -> np.ndarray:
        # One pool for the whole stream: draw as a single phase, then rotate by position.
        positions = np.arange(start, start + count)
        spec = self._specs[0]
        return spec.transform(self._draw(0, spec, positions), positions)


def rotate_images(rows: np.ndarray, image_shape: tuple[int, int], angles: np.ndarray) -> np.ndarray:
    """Each row, as an image, rotated about its centre by its angle in degrees."""
    images = rows.reshape(-1, *image_shape)
    out = np.empty_like(images)
    # Angles are quantised to ANGLE_STEP degrees, so a chunk holds one or two distinct
    # angles and each group rotates in one C call (per-image calls would cost as much as
    # training on the images).
    quantised = np.round(np.asarray(angles) / ANGLE_STEP) * ANGLE_STEP
    for angle in np.unique(quantised):
        selected = quantised == angle
        if angle == 0:
            out[selected] = images[selected]
            continue
        out[selected] = ndimage.rotate(
            images[selected], angle, axes=(2, 1), reshape=False, order=1, mode="constant"
        )
    return np.clip(out, 0.0, 1.0).reshape(len(rows), -1)


def invert(images: np.ndarray) -> np.ndarray:
    """Inverted images: ink becomes background (stays in [0, 1] for a Bernoulli decoder)."""
    return (1.0 - images).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ScenarioSpec:
    """A scenario by name and parameters: small and picklable, built where the data is.

    >>> ScenarioSpec("abrupt", phase_examples=1000).pool_names()
    ['mnist', 'inverted-mnist']
    """

    kind: str
    phase_examples: int = 200_000
    classes: str = "0-4,5-9"
    datasets: str = "mnist,inverted-mnist"
    rotation_degrees: float = 90.0
    rotation_span_examples: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCENARIOS:
            raise ValueError(f"unknown drift scenario {self.kind!r}; one of {SCENARIOS}")
        if self.phase_examples < 1:
            raise ValueError(f"phase examples must be positive, got {self.phase_examples}")
        if self.kind == "class-incremental":
            parse_classes(self.classes)
        if self.kind in ("abrupt", "recurring") and len(self.pool_names()) < 2:
            raise ValueError(f"{self.kind} needs two data sets or more, got {self.datasets!r}")

    def pool_names(self) -> list[str]:
        return [name.strip() for name in self.datasets.split(",") if name.strip()]


@functools.lru_cache(maxsize=4)
def build_scenario(
    spec: ScenarioSpec,
    dataset: str = "mnist",
    data_dir: str | None = None,
    fallback: str | None = None,
    seed: int = 0,
) -> Scenario:
    """The scenario `spec` names, over `dataset` (cached: a process builds it once)."""
    from pipeline.ingest.datasets import load_dataset

    base = load_dataset(dataset, data_dir, fallback=fallback)
    if spec.kind == "class-incremental":
        if base.train_labels is None:
            raise ValueError(f"class-incremental needs labels; {dataset} has none")
        return class_incremental(
            base.train,
            base.train_labels,
            spec.classes,
            spec.phase_examples,
            seed,
            base.test,
            base.test_labels,
        )
    if spec.kind == "gradual":
        return gradual_rotation(
            base.train,
            base.image_shape,
            start=spec.phase_examples,
            span=spec.rotation_span_examples or spec.phase_examples,
            max_angle=spec.rotation_degrees,
            seed=seed,
            test_images=base.test,
        )
    pools, test_pools = {}, {}
    for name in spec.pool_names():
        inverted = name.startswith("inverted-")
        source = name.removeprefix("inverted-")
        data = base if source == dataset else load_dataset(source, data_dir, fallback=fallback)
        if data.input_dim != base.input_dim:
            raise ValueError(f"{name} has {data.input_dim} inputs, {dataset} {base.input_dim}")
        pools[name] = invert(data.train) if inverted else data.train
        test_pools[name] = invert(data.test) if inverted else data.test
    cycle = spec.kind == "recurring"
    return abrupt(pools, spec.phase_examples, seed, test_pools, cycle=cycle)

"""Tests for pipeline.ingest.replay: a data set replayed as reshuffled passes, in chunks."""

import math

import numpy as np
import pytest

from pipeline.ingest.replay import replay_chunks

N = 23  # not a multiple of any chunk size used below: every pass ends in a short chunk


def _data(n: int = N) -> np.ndarray:
    # Row i is (i, -i): the first column identifies the example, the second checks that rows
    # travel whole.
    ids = np.arange(n, dtype=np.float32)
    return np.stack([ids, -ids], axis=1)


def _ids(chunks: list[np.ndarray]) -> list[int]:
    return [int(v) for v in np.concatenate(chunks)[:, 0]] if chunks else []


@pytest.mark.parametrize("chunk_size", [1, 4, 5, N, 100])
def test_every_pass_is_a_permutation_in_chunks_that_never_span_passes(chunk_size: int) -> None:
    data = _data()
    epochs = 3
    chunks = list(replay_chunks(data, chunk_size=chunk_size, epochs=epochs, seed=7))
    for chunk in chunks:
        assert chunk.shape[1] == 2
        np.testing.assert_array_equal(chunk[:, 1], -chunk[:, 0])  # rows stay whole
    # Each pass is ceil(N / chunk_size) chunks: full chunks, then what is left of the pass.
    per_pass = math.ceil(N / chunk_size)
    sizes = [len(c) for c in chunks]
    expected_pass = [min(chunk_size, N - start) for start in range(0, N, chunk_size)]
    assert len(expected_pass) == per_pass
    assert sizes == expected_pass * epochs
    ids = _ids(chunks)
    for epoch in range(epochs):
        assert sorted(ids[epoch * N : (epoch + 1) * N]) == list(range(N))


def test_passes_are_reshuffled() -> None:
    ids = _ids(list(replay_chunks(_data(), chunk_size=5, epochs=3, seed=0)))
    passes = [ids[i * N : (i + 1) * N] for i in range(3)]
    # Three identical orders (or the identity) of 23 items would be a 1-in-23! coincidence.
    assert passes[0] != passes[1] and passes[1] != passes[2]
    assert passes[0] != list(range(N))


@pytest.mark.parametrize("max_examples", [1, 4, 22, 23, 24, 50, 69])
def test_max_examples_is_exact(max_examples: int) -> None:
    chunks = list(replay_chunks(_data(), chunk_size=4, max_examples=max_examples, seed=1))
    assert sum(len(c) for c in chunks) == max_examples
    assert all(1 <= len(c) <= 4 for c in chunks)
    ids = _ids(chunks)
    # The examples taken from the first pass are distinct.
    assert len(set(ids[:N])) == min(max_examples, N)


def test_the_tighter_of_epochs_and_max_examples_wins() -> None:
    data = _data()
    by_epochs = list(replay_chunks(data, chunk_size=4, epochs=2, max_examples=1000, seed=0))
    assert sum(len(c) for c in by_epochs) == 2 * N
    by_examples = list(replay_chunks(data, chunk_size=4, epochs=2, max_examples=30, seed=0))
    assert sum(len(c) for c in by_examples) == 30
    # A limit cuts the sequence; it does not change it.
    assert _ids(by_examples) == _ids(by_epochs)[:30]


def test_without_limits_the_stream_is_unbounded() -> None:
    stream = replay_chunks(_data(), chunk_size=10, seed=0)
    taken = [next(stream) for _ in range(30)]  # 30 chunks = 10 passes of 23 (10 + 10 + 3)
    ids = _ids(taken)
    assert len(ids) == 10 * N
    for epoch in range(10):
        assert sorted(ids[epoch * N : (epoch + 1) * N]) == list(range(N))


def test_replay_is_deterministic_per_seed() -> None:
    data = _data()
    first = _ids(list(replay_chunks(data, chunk_size=4, epochs=3, seed=42)))
    again = _ids(list(replay_chunks(data, chunk_size=4, epochs=3, seed=42)))
    other = _ids(list(replay_chunks(data, chunk_size=4, epochs=3, seed=43)))
    assert first == again
    assert first != other


@pytest.mark.parametrize("skip", [0, 1, 3, 4, 5, 22, 23, 24, 40, 68])
def test_skip_yields_exactly_the_tail_of_the_unskipped_sequence(skip: int) -> None:
    data = _data()
    full = list(replay_chunks(data, chunk_size=4, max_examples=69, seed=3))
    resumed = list(replay_chunks(data, chunk_size=4, max_examples=69, seed=3, skip=skip))
    assert _ids(resumed) == _ids(full)[skip:]
    # After the (possibly partial) first chunk, the resumed run sees the very same chunks
    # as the uninterrupted one: a trainer resumed there gets the same minibatches.
    full_sizes = [len(c) for c in full]
    ends = np.cumsum(full_sizes).tolist()
    if skip in [0, *ends]:
        index = [0, *ends].index(skip)
        assert [c.tolist() for c in resumed] == [c.tolist() for c in full[index:]]
    else:
        first_end = next(end for end in ends if end > skip)
        assert len(resumed[0]) == first_end - skip
        later = full[ends.index(first_end) + 1 :]
        assert [c.tolist() for c in resumed[1:]] == [c.tolist() for c in later]


def test_skip_past_the_limit_yields_nothing() -> None:
    assert list(replay_chunks(_data(), chunk_size=4, max_examples=10, skip=10)) == []
    assert list(replay_chunks(_data(), chunk_size=4, epochs=1, skip=100)) == []


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_bad_chunk_size_is_rejected(chunk_size: int) -> None:
    with pytest.raises(ValueError, match=f"chunk_size must be positive, got {chunk_size}"):
        next(replay_chunks(_data(), chunk_size=chunk_size))


def test_empty_data_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot replay an empty data set"):
        next(replay_chunks(np.zeros((0, 3), np.float32), chunk_size=4))

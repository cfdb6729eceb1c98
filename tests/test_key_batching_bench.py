"""`aevb bench key-batching`, on a tiny model: what it measures and that its copy is exact."""

import numpy as np
import tensorflow as tf

import vae
from benchmarks.cli import build_parser, run
from benchmarks.key_batching import key_batching, stacking_copy

TINY = vae.VAEConfig(input_dim=12, latent_dim=2, hidden_dim=6, batch_size=5)


def test_the_three_ways_are_timed_per_key_step() -> None:
    result = key_batching(TINY, keys=3, repeats=3)
    assert result["keys"] == 3 and result["config"] == TINY.to_dict()
    for name in ("dedicated_ms", "shared_ms", "stacking_ms"):
        assert 0 < result[name] < 1000
    assert result["binding_ms"] == result["shared_ms"] - result["dedicated_ms"]
    assert result["batching_can_pay"] == (result["stacking_ms"] < result["binding_ms"])


def test_thestacking_copy_writes_every_key_its_own_values_back() -> None:
    trainers = [vae.Trainer(vae.VAEConfig(**{**TINY.to_dict(), "seed": s})) for s in (1, 2)]
    states = [tf.nest.flatten([t.model.parameters(), t.optimizer.state()]) for t in trainers]
    before = [[v.numpy().copy() for v in state] for state in states]
    assert not np.array_equal(before[0][0], before[1][0])  # two keys, two sets of values
    stacking_copy(states)()
    for state, values in zip(states, before, strict=True):
        for variable, value in zip(state, values, strict=True):
            np.testing.assert_array_equal(variable.numpy(), value)


def test_the_command_takes_model_flags() -> None:
    flags = "key-batching --hidden 6 --latent-dim 2 --input-dim 12 --batch-size 5 --keys 2"
    args = build_parser().parse_args([*flags.split(), "--repeats", "2"])
    result = run(args)
    assert (result["config"]["hidden_dim"], result["keys"]) == (6, 2)

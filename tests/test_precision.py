"""Mixed precision (`VAEConfig.precision`, `--precision`): bfloat16 products in the training
step, float32 everywhere else, and `auto`'s choice."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from shared_data import SHARED, needs_data

import vae
from pipeline.cli import main as cli
from pipeline.jobs.options import model_config
from pipeline.train.precision import (
    MIN_SPEEDUP,
    bfloat16_matrix_flags,
    choose_precision,
)
from vae.train import uses_xla

SMALL = vae.VAEConfig(input_dim=784, latent_dim=10, hidden_dim=200, batch_size=100)


def _digits(count: int, seed: int = 0) -> np.ndarray:
    """Binary images with structure: five fixed prototypes, 5% of their pixels flipped."""
    prototypes = np.random.default_rng(0).random((5, 784)) > 0.7
    rng = np.random.default_rng(seed + 1)
    rows = prototypes[rng.integers(0, 5, count)] ^ (rng.random((count, 784)) < 0.05)
    return rows.astype(np.float32)


def test_the_bfloat16_step_rounds_its_products_and_keeps_everything_else_float32() -> None:
    batch = _digits(100)
    full = vae.Trainer(SMALL)
    mixed = vae.Trainer(dataclasses.replace(SMALL, precision="bfloat16"))
    # Same seed: same initial parameters and the same noise, so only the products differ.
    first, first_mixed = full.train_step(batch), mixed.train_step(batch)
    difference = np.abs(first.elbo - first_mixed.elbo)
    # bfloat16 keeps 8 significant bits: a bound of ~-540 nats moves by a fraction of a nat.
    assert 0 < difference.max() < 0.5, difference.max()
    assert all(v.dtype == tf.float32 for v in mixed.model.trainable_variables)
    assert all(v.dtype == tf.float32 for v in mixed.optimizer.accumulators)


def test_xla_on_this_cpu_computes_a_bfloat16_dot_in_float32() -> None:
    """Why the bfloat16 step is not compiled by XLA (`vae.train.uses_xla`): should a
    TensorFlow upgrade change this, the choice must be measured again."""
    a, b = tf.ones([4, 8]), tf.ones([8, 3])

    @tf.function(jit_compile=True)
    def product(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        return tf.matmul(tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16))

    hlo = product.experimental_get_compiler_ir(a, b)(stage="optimized_hlo")
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots and all("= f32[4,3]" in line for line in dots), dots
    assert not uses_xla(dataclasses.replace(SMALL, precision="bfloat16"))
    assert uses_xla(SMALL)


def test_a_model_trained_in_bfloat16_learns_as_the_float32_one_does() -> None:
    train, test = _digits(6000), _digits(1000, seed=1)
    bounds = {}
    for precision in vae.PRECISIONS:
        trainer = vae.Trainer(dataclasses.replace(SMALL, precision=precision))
        for _ in range(2):
            for batch in np.split(train, 60):
                trainer.train_step(batch)
        bounds[precision] = float(np.mean(vae.evaluate(trainer.model, test).elbo))
    untrained = float(np.mean(vae.evaluate(vae.VAE(SMALL), test).elbo))
    assert bounds["float32"] > untrained + 200, (bounds, untrained)
    assert abs(bounds["bfloat16"] - bounds["float32"]) < 1.0, bounds


def test_a_bfloat16_trained_snapshot_is_a_float32_saved_model_recording_its_precision(
    tmp_path: pathlib.Path,
) -> None:
    trainer = vae.Trainer(dataclasses.replace(SMALL, precision="bfloat16"))
    trainer.train_step(_digits(100))
    vae.save(trainer.model, tmp_path / "1")
    reader = tf.train.load_checkpoint(str(tmp_path / "1" / "variables" / "variables"))
    dtypes = {
        name: dtype
        for name, dtype in reader.get_variable_to_dtype_map().items()
        if name.startswith("model/")
    }
    assert len(dtypes) == 8 and set(dtypes.values()) == {tf.float32}, dtypes
    restored = vae.load_model(tmp_path / "1")
    assert restored.config.precision == "bfloat16"
    rows = _digits(50, seed=2)
    # The snapshot computes in float32: the float32 model of the same parameters, exactly.
    full = vae.VAE(SMALL)
    for mine, theirs in zip(full.parameters(), trainer.model.parameters(), strict=True):
        mine.assign(theirs)
    expected = full.bound(rows, vae.EXPORT_SEED).elbo.numpy()
    np.testing.assert_allclose(vae.load(tmp_path / "1").elbo(rows), expected, rtol=1e-6)


def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path: pathlib.Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert bfloat16_matrix_flags(str(cpuinfo)) == {"avx512_bf16"}
    cpuinfo.write_text("flags\t\t: fpu avx2 fma\n")
    assert bfloat16_matrix_flags(str(cpuinfo)) == set()
    assert bfloat16_matrix_flags(str(tmp_path / "missing")) == set()


def test_auto_times_both_steps_where_the_cpu_has_bfloat16_and_follows_the_measure() -> None:
    config = vae.VAEConfig(input_dim=64, latent_dim=4, hidden_dim=32, batch_size=20)
    choice = choose_precision(config, cpu_flags={"avx512_bf16"})
    rates = choice.samples_per_second
    assert set(rates) == {"float32", "bfloat16"} and min(rates.values()) > 0
    faster = rates["bfloat16"] >= MIN_SPEEDUP * rates["float32"]
    assert choice.precision == ("bfloat16" if faster else "float32")
    assert f"{rates['bfloat16'] / rates['float32']:.2f}x" in choice.reason


def test_an_unresolved_auto_is_not_a_model() -> None:
    options = argparse.Namespace(precision="auto")
    with pytest.raises(ValueError, match="--precision auto is resolved before"):
        model_config(options, input_dim=4, likelihood="bernoulli")


@needs_data
def test_train_with_precision_auto_says_what_it_chose_and_records_it(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="aevb"):
        code = cli.main(
            [
                "train",
                "--dataset=mnist",
                f"--data-dir={SHARED}",
                "--hidden=16",
                "--latent-dim=2",
                "--max-examples=300",
                "--precision=auto",
                f"--output={run}",
            ]
        )
    assert code == 0
    said = [r.getMessage() for r in caplog.records if "--precision auto" in r.getMessage()]
    assert len(said) == 1, said
    chosen = said[0].split(":", 1)[1].split(",", 1)[0].strip()
    assert chosen in vae.PRECISIONS
    if not bfloat16_matrix_flags():
        assert chosen == "float32" and "no bfloat16 matrix instructions" in said[0]
    state = json.loads((run / "checkpoints" / "default" / "state.json").read_text())
    assert state["precision"] == chosen
    newest = vae.resolve_version(run / "snapshots" / "default")
    assert vae.read_metadata(newest)["config"]["precision"] == chosen

"""Tests for the serving contract of snapshots: vae.load, TF Serving warm-up, saved_model_cli,
and every signature served in a fresh process that cannot import TFP."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

import vae
from pipeline.train.snapshots import SnapshotWriter
from vae.serving import LoadedModel
from vae.snapshot_format import SIGNATURES, WARMUP_PATH

CONFIGS = {
    "bernoulli": vae.VAEConfig(input_dim=8, latent_dim=2, hidden_dim=6, batch_size=4, seed=3),
    "gaussian": vae.VAEConfig(
        input_dim=6, latent_dim=3, hidden_dim=5, likelihood="gaussian", batch_size=4, seed=4
    ),
}
OUTPUTS = {
    "serving_default": {"elbo", "latent_mean"},
    "encode": {"latent_mean", "latent_stddev"},
    "decode": {"mean"},
    "elbo": {"elbo", "reconstruction_log_likelihood", "kl"},
    "score": {"score"},
    "sample": {"z", "mean"},
}
INPUTS = {
    "serving_default": {"x"},
    "encode": {"x"},
    "decode": {"z"},
    "elbo": {"x"},
    "score": {"x"},
    "sample": {"num_samples", "seed"},
}


def _data(config: vae.VAEConfig, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if config.likelihood == "bernoulli":
        return (rng.random((rows, config.input_dim)) > 0.5).astype(np.float32)
    return rng.random((rows, config.input_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, tuple[vae.Trainer, pathlib.Path]]:
    """Per likelihood: a trainer after a few steps, and two snapshot versions of it written
    by the SnapshotWriter the training job uses (the second after more training)."""
    result = {}
    for likelihood, config in CONFIGS.items():
        run_dir = tmp_path_factory.mktemp(f"run-{likelihood}")
        trainer = vae.Trainer(config)
        writer = SnapshotWriter(run_dir, "default")
        for step in range(6):
            trainer.train_step(_data(config, 4, step))
            if step == 2:
                writer.write(trainer.model, {"examples_seen": trainer.examples_seen})
        writer.write(trainer.model, {"examples_seen": trainer.examples_seen})
        result[likelihood] = (trainer, writer.model_dir)
    return result


@pytest.fixture(params=sorted(CONFIGS))
def snapshot(request, snapshots) -> tuple[vae.Trainer, pathlib.Path]:
    return snapshots[request.param]


def _expected(model: vae.VAE, x: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    bound = model.bound(x, vae.EXPORT_SEED)
    q = model.posterior(x)
    return {
        "latent_mean": q.mean().numpy(),
        "latent_stddev": q.stddev().numpy(),
        "decode": model.decoder_mean(z).numpy(),
        "elbo": bound.elbo.numpy(),
        "score": -bound.elbo.numpy(),
    }


def test_load_resolves_the_newest_version_and_reads_its_config(snapshot) -> None:
    trainer, model_dir = snapshot
    loaded = vae.load(model_dir)
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == model_dir / "2" and loaded.version == 2
    assert loaded.config == trainer.model.config
    assert loaded.metadata["examples_seen"] == trainer.examples_seen
    assert loaded.input_dim == trainer.model.config.input_dim
    older = vae.load(model_dir / "1")  # a version directory as given
    assert older.version == 1 and older.metadata["examples_seen"] == 12
    assert repr(older).startswith("LoadedModel(") and "version=1" in repr(older)
    with pytest.raises(FileNotFoundError, match="neither a SavedModel directory"):
        vae.load(model_dir / "missing")


def test_load_runs_every_signature_like_the_trainers_model(snapshot) -> None:
    trainer, model_dir = snapshot
    model, config = trainer.model, trainer.model.config
    loaded = vae.load(model_dir)
    x = _data(config, 5, 99)
    z = np.random.default_rng(7).normal(size=(3, config.latent_dim)).astype(np.float32)
    expected = _expected(model, x, z)
    mean, stddev = loaded.encode(x)
    np.testing.assert_allclose(mean, expected["latent_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stddev, expected["latent_stddev"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.decode(z), expected["decode"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.score(x), expected["score"], rtol=1e-5)
    np.testing.assert_allclose(loaded.elbo(x), expected["elbo"], rtol=1e-5)
    predicted = loaded.predict(x)
    np.testing.assert_allclose(predicted["elbo"], expected["elbo"], rtol=1e-5)
    # Python lists work too; the score is per example and finite.
    assert loaded.score(x.tolist()).shape == (5,)
    assert np.all(np.isfinite(loaded.score(x)))

    draws = loaded.sample(4, seed=1)
    assert draws.z.shape == (4, config.latent_dim) and draws.mean.shape == (4, config.input_dim)
    np.testing.assert_allclose(draws.mean, model.decoder_mean(draws.z), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(loaded.sample(4, seed=1).z, draws.z)  # deterministic
    assert not np.array_equal(loaded.sample(4, seed=2).z, draws.z)
    assert loaded.sample(0).z.shape == (0, config.latent_dim)
    if config.likelihood == "gaussian":
        assert set(loaded.call("decode", z=z)) == {"mean", "stddev"}


def test_load_rejects_inputs_of_the_wrong_shape(snapshot) -> None:
    trainer, model_dir = snapshot
    loaded = vae.load(model_dir)
    width = trainer.model.config.input_dim
    with pytest.raises(ValueError, match=rf"x must be \[N, {width}\], got shape \(2, 3\)"):
        loaded.score(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"must be \[N, "):
        loaded.encode(np.zeros(width))  # one example must still be a batch of one
    with pytest.raises(ValueError, match="z must be"):
        loaded.decode(np.zeros((1, width)))
    with pytest.raises(ValueError, match="unknown signature"):
        loaded.call("train", x=np.zeros((1, width)))
    with pytest.raises(ValueError, match="n must not be negative"):
        loaded.sample(-1)


def _warmup_logs(version_dir: pathlib.Path) -> list[prediction_log_pb2.PredictionLog]:
    path = version_dir / WARMUP_PATH
    return [
        prediction_log_pb2.PredictionLog.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(str(path))
    ]


def test_every_snapshot_carries_warmup_requests_that_its_signatures_accept(snapshot) -> None:
    """Parsed with TF Serving's own protos, then replayed the way TF Serving's warm-up does:
    each PredictRequest's inputs fed to the signature it names."""
    trainer, model_dir = snapshot
    config = trainer.model.config
    for version_dir in (model_dir / "1", model_dir / "2"):
        logs = _warmup_logs(version_dir)
        assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * len(SIGNATURES)
        requests = [log.predict_log.request for log in logs]
        assert [r.model_spec.signature_name for r in requests] == list(SIGNATURES)
        assert {r.model_spec.name for r in requests} == {"default"}
        served = tf.saved_model.load(str(version_dir))
        for request in requests:
            name = request.model_spec.signature_name
            assert set(request.inputs) == INPUTS[name], name
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            if name == "sample":
                assert inputs["num_samples"].dtype == np.int32 and inputs["num_samples"].ndim == 0
            else:
                width = config.latent_dim if name == "decode" else config.input_dim
                rows = inputs["z" if name == "decode" else "x"]
                assert rows.dtype == np.float32 and rows.shape == (3, width)
                if name != "decode":  # valid input for the decoder: values in [0, 1]
                    assert rows.min() >= 0 and rows.max() <= 1 and len(np.unique(rows)) > 1
            signature = served.signatures[name]
            outputs = signature(**{k: tf.constant(v) for k, v in inputs.items()})
            expected = OUTPUTS[name] | (
                {"stddev"} if name == "decode" and config.likelihood == "gaussian" else set()
            )
            assert set(outputs) == expected, name
            for value in outputs.values():
                assert np.all(np.isfinite(value.numpy())), name
                assert value.shape[0] == 3, name


def test_warmup_file_is_tfrecord_framed_predictionlogs(snapshot) -> None:
    """The raw bytes: TFRecord framing around a PredictionLog whose field 6 is a PredictLog
    (tensorflow_serving/apis/prediction_log.proto), as TF Serving's reader expects."""
    _, model_dir = snapshot
    data = (model_dir / "2" / WARMUP_PATH).read_bytes()
    (length,) = np.frombuffer(data[:8], dtype="<u8")
    payload = data[12 : 12 + int(length)]
    assert payload[0] == (6 << 3) | 2  # field 6 (predict_log), wire type 2 (bytes)
    assert prediction_log_pb2.PredictionLog.FromString(payload).HasField("predict_log")


def _saved_model_cli() -> str:
    path = pathlib.Path(sys.executable).parent / "saved_model_cli"
    found = str(path) if path.exists() else shutil.which("saved_model_cli")
    if found is None:
        pytest.fail("saved_model_cli (installed with tensorflow) not found")
    return found


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures_with_named_inputs_and_outputs(snapshots) -> None:
    _, model_dir = snapshots["bernoulli"]
    config = CONFIGS["bernoulli"]
    completed = subprocess.run(
        [_saved_model_cli(), "show", "--dir", str(model_dir / "2"), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    blocks = re.split(r"\nsignature_def\['", completed.stdout)
    listed = {}
    for block in blocks[1:]:
        name = block.split("'", 1)[0]
        inputs_part, _, outputs_part = block.partition("contains the following output(s):")
        listed[name] = (
            set(re.findall(r"inputs\['(\w+)'\]", inputs_part)),
            set(re.findall(r"outputs\['(\w+)'\]", outputs_part)),
            "Method name is: tensorflow/serving/predict" in block,
        )
    for name in SIGNATURES:
        assert listed[name] == (INPUTS[name], OUTPUTS[name], True), name
    # Shapes as TF Serving sees them: x [-1, D], z [-1, J].
    assert f"shape: (-1, {config.input_dim})" in completed.stdout
    assert f"shape: (-1, {config.latent_dim})" in completed.stdout


NO_TFP_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    sys.modules["tensorflow_probability"] = None  # importing it now raises ImportError

    import numpy as np
    import vae

    request = json.load(open(sys.argv[1]))
    reply = {}
    for likelihood, item in request.items():
        model = vae.load(item["model_dir"])
        x, z = np.array(item["x"], np.float32), np.array(item["z"], np.float32)
        mean, stddev = model.encode(x)
        draws = model.sample(3, seed=5)
        reply[likelihood] = {
            "version": model.version,
            "latent_mean": mean.tolist(),
            "latent_stddev": stddev.tolist(),
            "decode": model.decode(z).tolist(),
            "score": model.score(x).tolist(),
            "elbo": model.elbo(x).tolist(),
            "serving_default": model.predict(x)["elbo"].tolist(),
            "sample_z": draws.z.tolist(),
            "sample_mean": draws.mean.tolist(),
        }
    try:
        import tensorflow_probability  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    print(json.dumps({"blocked": blocked, "reply": reply}))
    """
)


@pytest.mark.slow
def test_every_signature_in_a_process_without_tfp_matches_the_trainers_model(
    snapshots, tmp_path
) -> None:
    request, expected = {}, {}
    for likelihood, (trainer, model_dir) in snapshots.items():
        config = trainer.model.config
        x = _data(config, 5, 11)
        z = np.random.default_rng(12).normal(size=(4, config.latent_dim)).astype(np.float32)
        request[likelihood] = {"model_dir": str(model_dir), "x": x.tolist(), "z": z.tolist()}
        expected[likelihood] = _expected(trainer.model, x, z)
    (tmp_path / "request.json").write_text(json.dumps(request))
    (tmp_path / "serve.py").write_text(NO_TFP_SCRIPT)
    completed = subprocess.run(
        [sys.executable, "serve.py", "request.json"],
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["blocked"] is True
    for likelihood, (trainer, _) in snapshots.items():
        reply, want = result["reply"][likelihood], expected[likelihood]
        assert reply["version"] == 2
        for name in ("latent_mean", "latent_stddev", "decode", "score", "elbo"):
            np.testing.assert_allclose(reply[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(reply["serving_default"], want["elbo"], rtol=1e-5)
        sample_z = np.array(reply["sample_z"], np.float32)
        np.testing.assert_allclose(
            reply["sample_mean"], trainer.model.decoder_mean(sample_z), rtol=1e-5, atol=1e-6
        )


def test_importing_vae_load_does_not_import_tfp_or_tensorflow() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, vae; vae.load; vae.resolve_version; import pipeline.train.snapshots; "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_probability') "
            "if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"

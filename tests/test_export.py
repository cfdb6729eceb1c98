"""Tests for vae.export: the SavedModel's signatures, its outputs, and the way back to a VAE."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import vae
from vae.config import VAEConfig
from vae.export import EXPORT_SEED, SIGNATURES, ServingModule, exporter_for, load_model, save
from vae.model import VAE
from vae.snapshot_format import SAVED_MODEL_FILE

CONFIGS = {
    "bernoulli": VAEConfig(input_dim=8, latent_dim=2, hidden_dim=6, init_stddev=0.5, seed=3),
    "gaussian": VAEConfig(
        input_dim=6, latent_dim=3, hidden_dim=5, likelihood="gaussian", init_stddev=0.5, seed=4
    ),
}
SAMPLE_ARGS = {"num_samples": 4, "seed": 7}


INPUT_NAMES = {
    "serving_default": {"x"},
    "encode": {"x"},
    "decode": {"z"},
    "elbo": {"x"},
    "score": {"x"},
    "sample": {"num_samples", "seed"},
}


def _output_names(likelihood: str) -> dict[str, set[str]]:
    return {
        "serving_default": {"elbo", "latent_mean"},
        "encode": {"latent_mean", "latent_stddev"},
        "decode": {"mean", "stddev"} if likelihood == "gaussian" else {"mean"},
        "elbo": {"elbo", "reconstruction_log_likelihood", "kl"},
        "score": {"score"},
        "sample": {"z", "mean"},
    }


def _inputs(config: VAEConfig) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(config.seed)
    if config.likelihood == "bernoulli":
        x = rng.integers(0, 2, (5, config.input_dim)).astype(np.float32)
    else:
        x = rng.random((5, config.input_dim)).astype(np.float32)
    z = rng.normal(size=(4, config.latent_dim)).astype(np.float32)
    return {
        "serving_default": {"x": x},
        "encode": {"x": x},
        "decode": {"z": z},
        "elbo": {"x": x},
        "score": {"x": x},
    }


def _in_memory(model: VAE, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """What every signature except `sample` must return, computed on the in-memory model."""
    x, z = inputs["elbo"]["x"], inputs["decode"]["z"]
    bound = model.bound(x, EXPORT_SEED)
    q = model.posterior(x)
    decode = {"mean": model.decoder_mean(z).numpy()}
    if model.config.likelihood == "gaussian":
        decode["stddev"] = model.likelihood(z).stddev().numpy()
    return {
        "serving_default": {"elbo": bound.elbo.numpy(), "latent_mean": q.mean().numpy()},
        "encode": {"latent_mean": q.mean().numpy(), "latent_stddev": q.stddev().numpy()},
        "decode": decode,
        "elbo": {name: value.numpy() for name, value in bound._asdict().items()},
        "score": {"score": -bound.elbo.numpy()},
    }


def _call(signature, arguments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in signature(**arguments).items()}


def _assert_outputs_close(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, outputs in expected.items():
        assert set(actual[name]) == set(outputs), name
        for key, value in outputs.items():
            np.testing.assert_allclose(
                np.asarray(actual[name][key]), value, rtol=1e-5, atol=1e-4, err_msg=f"{name}/{key}"
            )


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[VAE, pathlib.Path]]:
    """One exported model per likelihood, with weights moved away from their initial values
    (so that a loader that forgot to copy them, rebuilding from the config, would be caught)."""
    result = {}
    for likelihood, config in CONFIGS.items():
        model = VAE(config)
        rng = np.random.default_rng(config.seed + 100)
        for variable in model.trainable_variables:
            variable.assign_add(rng.normal(0, 0.3, variable.shape).astype(np.float32))
        directory = tmp_path_factory.mktemp(f"export-{likelihood}") / "model"
        save(model, directory)
        result[likelihood] = (model, directory)
    return result


@pytest.fixture(params=sorted(CONFIGS))
def exported(request, exports) -> tuple[VAE, pathlib.Path]:
    return exports[request.param]


def test_public_names() -> None:
    documented = ("serving_default", "encode", "decode", "elbo", "score", "sample")
    assert vae.SIGNATURES == SIGNATURES == documented
    assert tuple(vae.EXPORT_SEED) == (0, 0)


def test_saved_model_lists_the_documented_signatures(exported) -> None:
    model, directory = exported
    assert (directory / "saved_model.pb").is_file()
    loaded = tf.saved_model.load(str(directory))
    assert set(loaded.signatures) == set(SIGNATURES)
    config = model.config
    inputs, outputs = INPUT_NAMES, _output_names(config.likelihood)
    for name in SIGNATURES:
        signature = loaded.signatures[name]
        args, kwargs = signature.structured_input_signature
        assert args == ()
        assert set(kwargs) == inputs[name], name
        assert set(signature.structured_outputs) == outputs[name], name
        for spec in kwargs.values():
            if name == "sample":
                assert (spec.dtype, spec.shape.rank) == (tf.int32, 0)
            else:
                dim = config.latent_dim if name == "decode" else config.input_dim
                assert spec.dtype == tf.float32
                assert spec.shape.as_list() == [None, dim]


def test_signatures_reproduce_the_in_memory_model(exported) -> None:
    model, directory = exported
    loaded = tf.saved_model.load(str(directory))
    inputs = _inputs(model.config)
    actual = {name: _call(loaded.signatures[name], args) for name, args in inputs.items()}
    expected = _in_memory(model, inputs)
    _assert_outputs_close(actual, expected)
    # The export seed is fixed: the same request gets the same score.
    again = _call(loaded.signatures["score"], inputs["score"])
    np.testing.assert_array_equal(again["score"], actual["score"]["score"])
    if model.config.likelihood == "bernoulli":
        assert np.all(actual["elbo"]["reconstruction_log_likelihood"] < 0)
    # The tf.function attributes are callable too, positionally.
    x = inputs["elbo"]["x"]
    np.testing.assert_allclose(loaded.score(x)["score"], expected["score"]["score"], rtol=1e-5)


def test_sample_signature(exported) -> None:
    model, directory = exported
    config = model.config
    sample = tf.saved_model.load(str(directory)).signatures["sample"]

    def call(num_samples: int, seed: int) -> dict[str, np.ndarray]:
        return _call(sample, {"num_samples": tf.constant(num_samples), "seed": tf.constant(seed)})

    first = call(**SAMPLE_ARGS)
    assert first["z"].shape == (4, config.latent_dim)
    assert first["mean"].shape == (4, config.input_dim)
    for name, value in call(**SAMPLE_ARGS).items():  # deterministic for a fixed seed
        np.testing.assert_array_equal(value, first[name])
    assert not np.array_equal(call(4, 8)["z"], first["z"])
    # The means are the decoder's at the returned z.
    np.testing.assert_allclose(first["mean"], model.decoder_mean(first["z"]), rtol=1e-5, atol=1e-6)

    many = call(2000, 1)
    assert np.all((many["mean"] >= 0) & (many["mean"] <= 1))  # probabilities / squashed means
    z = many["z"].astype(np.float64)
    # z ~ p(z) = N(0, I): per-dimension mean within 4 standard errors, variance near 1.
    assert np.all(np.abs(z.mean(axis=0)) < 4 / math.sqrt(len(z)))
    assert np.all(np.abs(z.var(axis=0) - 1) < 4 * math.sqrt(2 / len(z)))
    assert call(0, 1)["z"].shape == (0, config.latent_dim)


def test_load_model_round_trips_variables_and_config(exported) -> None:
    model, directory = exported
    restored = load_model(directory)
    assert isinstance(restored, VAE)
    assert restored.config == model.config
    assert len(restored.trainable_variables) == len(model.trainable_variables) == 8
    for a, b in zip(restored.trainable_variables, model.trainable_variables, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The weights come from the snapshot, not from re-running the seeded initialisation.
    fresh = VAE(model.config)
    assert not np.array_equal(fresh.decoder_output.bias.numpy(), restored.decoder_output.bias)
    assert load_model(os.fspath(directory)).config == model.config  # str paths work too
    x = _inputs(model.config)["elbo"]["x"]
    np.testing.assert_array_equal(
        restored.bound(x, [5, 6]).elbo.numpy(), model.bound(x, [5, 6]).elbo.numpy()
    )


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    # Neither TensorFlow Probability nor this package may be needed to serve the model.
    sys.modules["tensorflow_probability"] = None
    sys.modules["vae"] = None

    import numpy as np
    import tensorflow as tf

    with open(sys.argv[1]) as handle:
        requests = json.load(handle)  # {directory: {signature: {input: value}}}
    dtypes = {"num_samples": tf.int32, "seed": tf.int32}
    outputs = {}
    for directory, request in requests.items():
        loaded = tf.saved_model.load(directory)
        outputs[directory] = {}
        for name, arguments in request.items():
            tensors = {k: tf.constant(v, dtypes.get(k, tf.float32)) for k, v in arguments.items()}
            result = loaded.signatures[name](**tensors)
            outputs[directory][name] = {k: v.numpy().tolist() for k, v in result.items()}
    try:
        import tensorflow_probability  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    print(json.dumps({"blocked": blocked, "outputs": outputs}))
    """
)


@pytest.mark.slow
def test_saved_model_serves_without_tfp_or_this_package(exports, tmp_path) -> None:
    requests, expected = {}, {}
    for likelihood, (model, directory) in exports.items():
        inputs = _inputs(model.config)
        request = {name: {k: v.tolist() for k, v in args.items()} for name, args in inputs.items()}
        request["sample"] = dict(SAMPLE_ARGS)
        requests[str(directory)] = request
        expected[likelihood] = _in_memory(model, inputs)
        sample = tf.saved_model.load(str(directory)).signatures["sample"]
        arguments = {k: tf.constant(v) for k, v in SAMPLE_ARGS.items()}
        expected[likelihood]["sample"] = {k: v.numpy() for k, v in sample(**arguments).items()}
    requests_path = tmp_path / "requests.json"
    requests_path.write_text(json.dumps(requests))
    script = tmp_path / "serve.py"
    script.write_text(SUBPROCESS_SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, str(script), str(requests_path)],
        cwd=tmp_path,  # not the checkout, so `vae` could not be found anyway
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    reply = json.loads(completed.stdout.strip().splitlines()[-1])
    assert reply["blocked"] is True
    for likelihood, (_, directory) in exports.items():
        outputs = reply["outputs"][str(directory)]
        assert set(outputs) == set(SIGNATURES)
        _assert_outputs_close(outputs, expected[likelihood])


def _all_outputs(directory: pathlib.Path, inputs: dict) -> dict[str, dict[str, np.ndarray]]:
    loaded = tf.saved_model.load(str(directory))
    arguments = {**inputs, "sample": {k: tf.constant(v) for k, v in SAMPLE_ARGS.items()}}
    return {name: _call(loaded.signatures[name], arguments[name]) for name in SIGNATURES}


def test_snapshots_share_one_traced_graph_and_equal_a_direct_export(exports, tmp_path) -> None:
    """`save` writes the configuration's graph traced once plus the model's variables: the
    same outputs, bit for bit, as `tf.saved_model.save` of the model's own module."""
    for likelihood, (model, directory) in exports.items():
        direct = tmp_path / f"direct-{likelihood}"
        module = ServingModule(model)
        tf.saved_model.save(module, str(direct), signatures=module.signatures())
        inputs = _inputs(model.config)
        ours, theirs = _all_outputs(directory, inputs), _all_outputs(direct, inputs)
        for name in SIGNATURES:
            for output, value in theirs[name].items():
                np.testing.assert_array_equal(ours[name][output], value, err_msg=name)
    # One exporter per configuration, whatever the seed: a second model does not trace again.
    config = CONFIGS["bernoulli"]
    assert exporter_for(config) is exporter_for(dataclasses.replace(config, seed=99))


def test_snapshot_restores_through_the_graph_saver_as_tf_serving_does(exports) -> None:
    """TF Serving's C++ loader restores variables by the graph's saver ops, by tensor name:
    the TF1 loader takes the same path, so the names the variables were written under must
    be the ones the copied graph reads."""
    model, directory = exports["gaussian"]
    x = _inputs(model.config)["elbo"]["x"]
    expected = model.bound(x, EXPORT_SEED).elbo.numpy()
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(directory))
        signature = meta_graph.signature_def["elbo"]
        elbo = session.run(signature.outputs["elbo"].name, {signature.inputs["x"].name: x})
    np.testing.assert_allclose(elbo, expected, rtol=1e-5, atol=1e-4)


def test_without_a_link_the_graph_is_written(exports, tmp_path, monkeypatch) -> None:
    # As on another file system than the graph directory's, or an object store.
    def cross_device(source, target):
        raise OSError(18, "Invalid cross-device link")

    model, _ = exports["bernoulli"]
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    linked = tmp_path / "linked"
    vae.save(model, linked, graph_dir=graphs)
    monkeypatch.setattr(os, "link", cross_device)
    written = tmp_path / "written"
    vae.save(model, written, graph_dir=graphs)
    assert (linked / SAVED_MODEL_FILE).stat().st_nlink == 2
    assert (written / SAVED_MODEL_FILE).stat().st_nlink == 1
    graph = (linked / SAVED_MODEL_FILE).read_bytes()
    assert (written / SAVED_MODEL_FILE).read_bytes() == graph
    inputs = _inputs(model.config)
    ours, theirs = _all_outputs(written, inputs), _all_outputs(linked, inputs)
    for name in SIGNATURES:
        for output, value in theirs[name].items():
            np.testing.assert_array_equal(ours[name][output], value, err_msg=name)


def test_an_exporter_refuses_a_model_of_another_configuration(tmp_path) -> None:
    exporter = exporter_for(CONFIGS["bernoulli"])
    with pytest.raises(ValueError, match="this exporter writes models of"):
        exporter.save(VAE(CONFIGS["gaussian"]), tmp_path / "model")

"""Tests for `aevb score` (pipeline.jobs.score, pipeline.score): job, thresholds, model handler,
and a streaming job that switches to new snapshot versions while a trainer writes them."""

import collections
import dataclasses
import json
import logging
import pathlib
import shutil
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import ModelMetadata, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

import vae
from pipeline.cli.main import main
from pipeline.ingest import lifecycle
from pipeline.ingest.decode import KeyedChunk
from pipeline.jobs.score import build_scoring_pipeline
from pipeline.outputs.scores import read_scores
from pipeline.score.anomalies import Threshold, _FlagAnomaliesFn
from pipeline.score.model_handler import (
    SnapshotModelHandler,
    WatchSnapshots,
    _FollowedModel,
    _RouteToModelsFn,
)
from pipeline.train.session import Cadence, TrainingSession
from pipeline.train.snapshots import SnapshotWriter
from vae.snapshot_format import read_metadata

CONFIG = vae.VAEConfig(input_dim=8, latent_dim=2, hidden_dim=8, batch_size=10, seed=5)


def _rows(n: int, seed: int, dim: int = 8) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, dim)) > 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """A model directory with versions 1 and 2 of a model trained a few steps between them."""
    run_dir = tmp_path_factory.mktemp("run")
    trainer = vae.Trainer(CONFIG)
    writer = SnapshotWriter(run_dir, "default")
    writer.write(trainer.model, {})
    for step in range(5):
        trainer.train_step(_rows(10, step))
    writer.write(trainer.model, {})
    return writer.model_dir


# --- Thresholds ---------------------------------------------------------------------------


def _result(key: str, score: float) -> PredictionResult:
    inference = {"score": np.float32(score), "latent_mean": np.zeros(2, np.float32)}
    return PredictionResult((key, "src", 3), inference, "/m/default/7")


def _flag(threshold: Threshold, results: list[PredictionResult]) -> list[dict]:
    fn = _FlagAnomaliesFn(threshold)
    fn.setup()
    return [out for result in results for out in fn.process(result)]


def test_fixed_threshold_flags_scores_above_it() -> None:
    out = _flag(Threshold(value=10.0), [_result("a", s) for s in (9.0, 10.0, 10.5)])
    assert [o["anomaly"] for o in out] == [False, False, True]
    assert {o["threshold"] for o in out} == {10.0}
    assert out[0]["model_version"] == 7 and out[0]["position"] == 3
    assert _flag(Threshold(), [_result("a", 1e9)])[0]["anomaly"] is None  # no threshold


def test_quantile_threshold_uses_the_recent_scores_of_each_key() -> None:
    # Window of 4, 75th percentile of the previous 4 scores of the same key.
    scores = [1.0, 2.0, 3.0, 4.0, 3.9, 100.0, 5.0]
    results = [_result("a", s) for s in scores] + [_result("b", 50.0)]
    out = _flag(Threshold(quantile=0.75, window=4), results)
    thresholds = [o["threshold"] for o in out]
    # Unknown until 4 scores were seen; then np.quantile of the 4 before each record.
    assert thresholds[:4] == [None] * 4 and [o["anomaly"] for o in out[:4]] == [None] * 4
    assert thresholds[4] == pytest.approx(np.quantile([1, 2, 3, 4], 0.75))
    assert thresholds[5] == pytest.approx(np.quantile([2, 3, 4, 3.9], 0.75))
    assert thresholds[6] == pytest.approx(np.quantile([3, 4, 3.9, 100], 0.75))
    assert [o["anomaly"] for o in out[4:7]] == [True, True, False]
    assert out[7]["key"] == "b" and out[7]["anomaly"] is None  # b has its own window


def test_threshold_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        Threshold(value=1.0, quantile=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Threshold(quantile=1.0)
    with pytest.raises(ValueError, match="window must be positive"):
        Threshold(quantile=0.5, window=0)


# --- The model handler ----------------------------------------------------------------------


def test_handler_scores_a_chunk_per_row_with_the_version_it_used(model_dir) -> None:
    handler = SnapshotModelHandler(str(model_dir))
    model = handler.load_model()
    rows = _rows(4, 50)
    chunk = KeyedChunk("k", rows, "f.npy", np.array([2, 3, 5, 8]))
    results = list(handler.run_inference(chunk, model))
    expected = vae.load(model_dir / "2")
    assert [r.model_id for r in results] == [str(model_dir / "2")] * 4
    assert [r.example for r in results] == [("k", "f.npy", p) for p in (2, 3, 5, 8)]
    np.testing.assert_allclose([r.inference["score"] for r in results], expected.score(rows))
    np.testing.assert_allclose(
        np.stack([r.inference["latent_mean"] for r in results]), expected.encode(rows)[0]
    )
    assert handler.should_skip_batching() and handler.get_num_bytes(chunk) == rows.nbytes
    assert len(chunk) == 4


def test_followed_model_switches_to_new_versions_and_survives_a_broken_one(
    model_dir, tmp_path, caplog
) -> None:
    directory = tmp_path / "default"
    directory.mkdir()
    shutil.copytree(model_dir / "1", directory / "1")
    now = [0.0]
    followed = _FollowedModel(
        str(directory), follow=True, poll_interval_seconds=10, clock=lambda: now[0]
    )
    assert followed.current().version == 1
    shutil.copytree(model_dir / "2", directory / "2")
    assert followed.current().version == 1  # not polled before the interval
    now[0] = 10.0
    assert followed.current().version == 2
    # A directory that is not a loadable SavedModel (never produced by the writer, which
    # renames complete versions into place): logged, and the current model kept.
    (directory / "3").mkdir()
    (directory / "3" / "saved_model.pb").write_bytes(b"not a SavedModel")
    now[0] = 20.0
    with caplog.at_level(logging.WARNING, logger="pipeline.jobs.score"):
        assert followed.current().version == 2
    assert "keeping version 2" in caplog.text
    # A version directory is pinned: never followed.
    pinned = _FollowedModel(
        str(directory / "1"), follow=True, poll_interval_seconds=1, clock=lambda: now[0]
    )
    now[0] = 100.0
    assert pinned.current().version == 1


def test_handler_follows_the_model_side_input_like_watch_file_pattern(model_dir) -> None:
    """Beam's model-update path: RunInference with a ModelMetadata side input loads the
    version it names through `update_model_path` (here version 1, the older one)."""
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        metadata = pipeline | "Metadata" >> beam.Create(
            [ModelMetadata(model_id=str(model_dir / "1"), model_name="1")]
        )
        results = (
            pipeline
            | beam.Create([KeyedChunk("default", _rows(3, 60), "src")])
            | RunInference(SnapshotModelHandler(str(model_dir)), model_metadata_pcoll=metadata)
            | beam.Map(lambda r: (r.model_id, float(r.inference["score"])))
        )
        expected = [
            (str(model_dir / "1"), float(s)) for s in vae.load(model_dir / "1").score(_rows(3, 60))
        ]
        assert_that(results, equal_to(expected, equals_fn=_close_pairs))


def _close_pairs(a, b) -> bool:
    return a[0] == b[0] and abs(a[1] - b[1]) <= 1e-4 * max(1.0, abs(b[1]))


_watched: dict[str, list] = collections.defaultdict(list)


class _CollectMetadata(beam.DoFn):
    def __init__(self, tag: str) -> None:
        self._tag = tag

    def process(self, metadata: ModelMetadata):
        _watched[self._tag].append((metadata.model_name, metadata.model_id))
        if metadata.model_name == "3":
            # The test's cue to add version 4 while the watch runs.
            (pathlib.Path(metadata.model_id).parent / "4.tmp").rename(
                pathlib.Path(metadata.model_id).parent / "4"
            )
        if metadata.model_name == "4":
            lifecycle.request_stop(self._tag)  # ends the watch
        yield metadata


def test_watch_snapshots_announces_the_newest_version_then_each_new_one(tmp_path) -> None:
    directory = tmp_path / "default"
    for version in ("1", "2", "3", "4.tmp"):
        (directory / version).mkdir(parents=True)
        (directory / version / "saved_model.pb").write_bytes(b"x")
    tag = uuid.uuid4().hex
    options = PipelineOptions(["--runner=FnApiRunner", "--streaming"])
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | WatchSnapshots(
                str(directory), poll_interval_seconds=0.05, job_id=tag, stop_after_seconds=60
            )
            | beam.ParDo(_CollectMetadata(tag))
        )
    lifecycle.clear(tag)
    # Versions 1 and 2 existed but were superseded at once: only 3, then 4 when it appeared.
    assert _watched[tag] == [("3", str(directory / "3")), ("4", str(directory / "4"))]


# --- The batch job --------------------------------------------------------------------------


def test_aevb_score_batch_files_job(model_dir, tmp_path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    rows = _rows(30, 70)
    rows[4, 0] = 3.0  # outside a Bernoulli decoder's support: a dead letter
    np.save(inbox / "a.npy", rows)
    lines = [json.dumps(r.tolist()) for r in _rows(5, 71)]
    (inbox / "b.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    newest = vae.load(model_dir)
    # Halfway between two neighbouring scores: no record sits on the threshold itself.
    ranked = np.sort(newest.score(rows[rows.max(axis=1) <= 1]))
    threshold = float(ranked[len(ranked) // 2 : len(ranked) // 2 + 2].mean())
    out = tmp_path / "out"
    code = main(
        [
            "score",
            "--model",
            str(model_dir),
            "--source",
            f"files:{inbox}/*",
            "--output",
            str(out),
            "--threshold",
            str(threshold),
        ]
    )
    assert code == 0
    records = read_scores(out)
    by_file = collections.defaultdict(dict)
    for record in records:
        by_file[record["source"]][record["position"]] = record
    # Every valid row once, with its position: .npy rows 0-based, JSON lines 1-based lines.
    assert sorted(by_file[str(inbox / "a.npy")]) == [i for i in range(30) if i != 4]
    assert sorted(by_file[str(inbox / "b.jsonl")]) == [1, 3, 4, 5, 6]
    assert {r["model_version"] for r in records} == {2}  # the newest, for the whole job
    assert {r["key"] for r in records} == {"default"}
    # The file's valid rows are one chunk, scored in one call: as the served model scores
    # them in one request (the bound's noise is drawn per batch from the fixed export seed).
    valid = [i for i in range(30) if i != 4]
    expected = dict(zip(valid, newest.score(rows[valid]).tolist(), strict=True))
    for position, record in by_file[str(inbox / "a.npy")].items():
        assert record["score"] == pytest.approx(expected[position], rel=1e-5, abs=1e-5)
        # Judged on the unrounded score; the record carries it rounded.
        assert record["anomaly"] == (expected[position] > threshold)
        assert record["threshold"] == pytest.approx(threshold)
        assert len(record["latent_mean"]) == CONFIG.latent_dim
    assert 0 < sum(r["anomaly"] for r in records) < len(records)
    letters = [
        json.loads(line)
        for path in (out / "dead_letter").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted((letter["reason"], letter["position"]) for letter in letters) == [
        ("out_of_support", 4),
        ("wrong_width", 2),
    ]


def test_score_dataset_source_with_a_quantile_threshold(tmp_path) -> None:
    config = vae.VAEConfig(input_dim=784, latent_dim=2, hidden_dim=8)
    writer = SnapshotWriter(tmp_path / "run", "default")
    writer.write(vae.VAE(config), {})
    out = tmp_path / "out"
    options = PipelineOptions(
        [
            "--runner=FnApiRunner",
            f"--model={writer.model_dir}",
            "--source=dataset",
            "--dataset=mnist",
            "--split=test",
            "--max-examples=250",
            "--chunk-size=100",
            f"--output={out}",
            "--threshold-quantile=0.9",
            "--threshold-window=50",
        ]
    )
    with beam.Pipeline(options=options) as pipeline:
        build_scoring_pipeline(pipeline, options)
    records = read_scores(out)
    assert len(records) == 250
    assert {r["source"] for r in records} == {"dataset:mnist/test"}
    assert {r["position"] for r in records} == {None}
    assert sum(r["anomaly"] is None for r in records) == 50  # until the window is full
    flagged = [r["anomaly"] for r in records if r["anomaly"] is not None]
    assert 0 < sum(flagged) < 0.3 * len(flagged)  # roughly the top 10 %


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--streaming", "--model-updates", "side-input"], "needs a runner that feeds"),
        (
            ["--streaming", "--model-updates", "side-input", "--runner", "PrismRunner"],
            "PrismRunner would score nothing",
        ),
        (["--threshold", "3", "--threshold-quantile", "0.9"], "not both"),
        (["--threshold-quantile", "1.5"], "between 0 and 1"),
        (["--source", "ftp://x"], "must be one of"),
    ],
)
def test_aevb_score_usage_errors(model_dir, tmp_path, capsys, flags, message) -> None:
    argv = ["score", "--model", str(model_dir), "--output", str(tmp_path / "o"), *flags]
    assert _exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_aevb_score_needs_a_model(tmp_path, capsys) -> None:
    assert _exit_code(["score", "--model", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "neither a SavedModel directory" in capsys.readouterr().err
    assert _exit_code(["score", "--output", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int:
    """main's status, also when argparse exits (flag errors)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


# --- The streaming job following new versions ----------------------------------------------


@pytest.mark.slow
def test_streaming_score_job_switches_to_new_versions_while_a_trainer_writes_them(
    tmp_path,
) -> None:
    """A streaming `score` job runs on FnApiRunner while a TrainingSession (the trainer's own
    class) writes new snapshot versions in a thread; new input files keep arriving. The
    job switches versions without a restart, and every record was scored by a complete
    version: its score is exactly what that version directory gives for the record."""
    run_dir, inbox, out = tmp_path / "run", tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    session = TrainingSession(
        run_dir, "default", CONFIG, Cadence(log_every_steps=1000, keep_snapshots=1000)
    )
    session.train(_rows(10, 0))
    session.snapshot("before the scoring job")
    job_id = uuid.uuid4().hex
    written: dict[str, np.ndarray] = {}
    versions: list[str] = []
    failures: list[BaseException] = []

    def trainer_and_producer() -> None:
        try:
            deadline = time.monotonic() + 120
            for index in range(10_000):
                rows = _rows(20, 1000 + index)
                target = inbox / f"batch-{index:04d}.npy"
                part = inbox / f"batch-{index:04d}.part"  # not matched by the glob
                with open(part, "wb") as handle:
                    np.save(handle, rows)
                written[str(target)] = rows
                part.rename(target)
                for step in range(3):
                    session.train(_rows(10, 10 * index + step))
                versions.append(session.snapshot("test").name)
                seen = {r["model_version"] for r in read_scores(out)}
                if len(seen) >= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)  # pace the versions: the job should see several
        except BaseException as error:  # reported by the test
            failures.append(error)
        finally:
            lifecycle.request_stop(job_id)

    options = PipelineOptions(
        [
            "--runner=FnApiRunner",
            "--streaming",
            f"--model={run_dir / 'snapshots' / 'default'}",
            f"--source=files:{inbox}/*.npy",
            "--poll-interval-seconds=0.1",
            "--model-poll-seconds=0.2",
            f"--output={out}",
            "--threshold-quantile=0.9",
            "--threshold-window=20",
        ]
    )
    thread = threading.Thread(target=trainer_and_producer, daemon=True)
    started = time.monotonic()
    with beam.Pipeline(options=options) as pipeline:
        build_scoring_pipeline(pipeline, options, job_id=job_id)
        thread.start()
    thread.join(timeout=60)
    lifecycle.clear(job_id)
    assert not failures, failures
    assert time.monotonic() - started < 180

    records = read_scores(out)
    assert records, "the streaming job scored nothing"
    used = [r["model_version"] for r in records]
    assert len(set(used)) >= 2, f"one model version only: {sorted(set(used))}"
    assert set(used) <= {int(v) for v in ["1", *versions]}
    # Switches only forward, within the single worker's output file.
    assert used == sorted(used)
    model_dir = run_dir / "snapshots" / "default"
    loaded = {v: vae.load(model_dir / str(v)) for v in set(used)}
    for version, model in loaded.items():
        # A complete snapshot: the SavedModel, its variables and its metadata.
        version_dir = model_dir / str(version)
        assert (version_dir / "saved_model.pb").is_file()
        assert (version_dir / "variables" / "variables.index").is_file()
        assert read_metadata(version_dir)["version"] == version
        # Each file is one chunk of 20 rows, scored in one call: the same call here must give
        # the same scores (the bound's noise is drawn per batch from the fixed export seed).
        mine = [r for r in records if r["model_version"] == version]
        for source in {r["source"] for r in mine}:
            expected = model.score(written[source])
            for record in (r for r in mine if r["source"] == source):
                assert record["score"] == pytest.approx(
                    expected[record["position"]], rel=1e-5, abs=1e-5
                )
    # Each record exactly once.
    keys = [(r["source"], r["position"]) for r in records]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("max_models", [None, 1])
def test_a_model_per_key_scores_each_key_with_its_own(tmp_path, max_models) -> None:
    run = tmp_path / "run"
    models = {}
    for key, seed in (("tenant-a", 11), ("tenant-b", 12)):
        writer = SnapshotWriter(run, key)
        writer.write(vae.VAE(dataclasses.replace(CONFIG, seed=seed)), {})
        models[key] = vae.load(writer.model_dir)
    rows = _rows(9, 80)
    keys = ["tenant-a", "tenant-b", "tenant-c"] * 3  # tenant-c has no model
    inbox = tmp_path / "in"
    inbox.mkdir()
    lines = [json.dumps({"key": k, "x": r.tolist()}) for k, r in zip(keys, rows, strict=True)]
    (inbox / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["score", "--models", str(run / "snapshots"), "--source", f"files:{inbox}/*"]
    if max_models is not None:
        argv += ["--max-models-per-worker", str(max_models)]
    assert main([*argv, "--output", str(out)]) == 0

    records = sorted(read_scores(out), key=lambda r: r["position"])
    assert [r["key"] for r in records] == [k for k in keys if k != "tenant-c"]
    for key, model in models.items():
        # A key's records come as one chunk, and the bound's noise is drawn per batch:
        # the expected scores are the same rows scored together by that key's model.
        mine = [r for r in records if r["key"] == key]
        expected = model.score(rows[[r["position"] - 1 for r in mine]])  # lines count from 1
        np.testing.assert_allclose([r["score"] for r in mine], expected, atol=1e-5)
        assert {r["model_version"] for r in mine} == {1}
    # The two models differ, so each record was scored by its own key's.
    a_row = rows[0][None, :]
    assert models["tenant-a"].score(a_row)[0] != pytest.approx(models["tenant-b"].score(a_row)[0])
    letters = [json.loads(line) for path in (out / "dead_letter").glob("*.jsonl")
               for line in path.read_text().splitlines()]  # fmt: skip
    assert sorted((x["reason"], x["position"]) for x in letters) == [
        ("no_model", 3), ("no_model", 6), ("no_model", 9)
    ]  # fmt: skip


def test_models_of_different_inputs_are_refused_in_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    SnapshotWriter(run, "a").write(vae.VAE(CONFIG), {})
    SnapshotWriter(run, "b").write(vae.VAE(dataclasses.replace(CONFIG, input_dim=9)), {})
    argv = ["score", "--models", str(run / "snapshots"), "--dataset", "mnist-5k"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "read different inputs" in capsys.readouterr().err


def test_records_of_a_key_whose_model_reads_other_inputs_are_dead_letters(tmp_path) -> None:
    snapshots = tmp_path / "run" / "snapshots"
    SnapshotWriter(tmp_path / "run", "fits").write(vae.VAE(CONFIG), {})
    SnapshotWriter(tmp_path / "run", "wide").write(
        vae.VAE(dataclasses.replace(CONFIG, input_dim=9)), {}
    )
    route = _RouteToModelsFn(str(snapshots), CONFIG.input_dim, CONFIG.likelihood)
    route.setup()
    out = {
        key: list(route.process(KeyedChunk(key, _rows(2, 1), "f.jsonl", np.array([3, 4]))))
        for key in ("fits", "wide", "none")
    }
    assert [chunk.key for chunk in out["fits"]] == ["fits"]
    for key, words in (("wide", "reads (9, 'bernoulli')"), ("none", "no snapshot")):
        letters = [tagged.value for tagged in out[key]]
        assert [(x.reason, x.position) for x in letters] == [("no_model", 3), ("no_model", 4)]
        assert words in letters[0].detail

"""A run directory on an object store (`pipeline.ingest.run_mirror`), against a real S3 endpoint
(moto's server, as a process on loopback): checkpoints and snapshots published by one worker
are restored and numbered on by another; a snapshot version is published with its
`saved_model.pb` last and pruned with it first, so a poller listing the store during writes
never loads a partial version (tensorflow/serving#1086); a training job with two worker
processes writes its run directory, dead letters and progress there, and a restarted job with
an empty working copy resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import boto3
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from services import needed

import vae
from benchmarks.services import S3_TEST_CREDENTIALS, s3_server, s3_server_executable
from pipeline.ingest import run_mirror
from pipeline.ingest.datasets import load_dataset
from pipeline.ingest.run_mirror import (
    RunMirror,
    configure_stores,
    fetch_version,
    published_objects,
    published_versions,
    use_store_options,
)
from pipeline.outputs.jsonl import WorkerJsonLines, read_json_lines
from pipeline.outputs.scores import read_scores
from pipeline.score.model_handler import SnapshotModelHandler
from pipeline.train.checkpoints import CheckpointStore, saved_state
from pipeline.train.snapshots import SnapshotWriter, newest_snapshot_metadata
from vae.snapshot_format import read_metadata

CONFIG = vae.VAEConfig(input_dim=8, latent_dim=2, hidden_dim=8, batch_size=4, seed=3)
AEVB = pathlib.Path(sys.executable).parent / "aevb"
BUCKET = "runs"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 endpoint with the bucket `BUCKET`; this process's `FileSystems` configured
    for it."""
    saved = {name: os.environ.get(name) for name in S3_TEST_CREDENTIALS}
    os.environ.update(S3_TEST_CREDENTIALS)
    try:
        needed(s3_server_executable)
        with s3_server(tmp_path_factory.mktemp("s3")) as url:
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
            use_store_options({"s3_endpoint_url": url})
            yield url
    finally:
        configure_stores(PipelineOptions())
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def run_url(endpoint: str) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


def _trainer(steps: int) -> vae.Trainer:
    trainer = vae.Trainer(CONFIG)
    data = (np.random.default_rng(0).random((4 * steps, 8)) > 0.5).astype(np.float32)
    for batch in np.split(data, steps):
        trainer.train_step(batch)
    return trainer


def _names(urls: list[str], root: str) -> list[str]:
    return [url.removeprefix(root + "/") for url in urls]


def test_a_checkpoint_published_by_one_worker_is_restored_by_another(run_url, tmp_path):
    first = RunMirror(run_url, tmp_path / "first")
    trainer = _trainer(steps=3)
    store = CheckpointStore(first.local / "checkpoints" / "k", trainer, max_to_keep=2, mirror=first)
    for _ in range(3):
        trainer.train_step(np.ones((4, 8), np.float32))
        store.save(session_state={"detector": 7})
    published = published_objects(f"{run_url}/checkpoints/k/*")
    # The two newest kept, each with its ledger; state.json names the newest.
    assert _names(published, f"{run_url}/checkpoints/k") == [
        "ckpt-5.npz",
        "ckpt-6.npz",
        "config.json",
        "read_ledger-5.json",
        "read_ledger-6.json",
        "state.json",
    ]
    assert saved_state(run_url, "k") == {
        "step": 6,
        "examples_seen": 24,
        "checkpoint": 6,
        "precision": "float32",
    }

    second = RunMirror(run_url, tmp_path / "second")  # another worker: an empty working copy
    resumed = vae.Trainer(CONFIG)
    restored = CheckpointStore(
        second.local / "checkpoints" / "k", resumed, max_to_keep=2, mirror=second
    )
    assert restored.restore()
    assert (resumed.step, resumed.examples_seen) == (6, 24)
    assert restored.session_state == {"detector": 7}
    pairs = zip(resumed.model.trainable_variables, trainer.model.trainable_variables, strict=True)
    for mine, theirs in pairs:
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    # It numbers on from the published checkpoint and rotates the first worker's away.
    resumed.train_step(np.ones((4, 8), np.float32))
    restored.save()
    restored.save()  # nothing trained: still a new number, never one rewritten
    assert saved_state(run_url, "k")["checkpoint"] == 8
    remaining = published_objects(f"{run_url}/checkpoints/k/ckpt-*.npz")
    assert _names(remaining, f"{run_url}/checkpoints/k") == ["ckpt-7.npz", "ckpt-8.npz"]


def test_snapshot_versions_number_above_every_published_one_and_are_pruned_on_the_store(
    run_url, tmp_path
):
    model = _trainer(steps=2).model
    first = SnapshotWriter(
        tmp_path / "first", "k", keep=2, mirror=RunMirror(run_url, tmp_path / "first")
    )
    for examples in (10, 20):
        first.write(model, {"examples_seen": examples})
    second = SnapshotWriter(
        tmp_path / "second", "k", keep=2, mirror=RunMirror(run_url, tmp_path / "second")
    )
    assert second.latest_version() == 2  # seen on the store, not in its working copy
    assert second.write(model, {"examples_seen": 30}).name == "3"
    versions = published_versions(f"{run_url}/snapshots/k")
    assert _names(versions, f"{run_url}/snapshots/k") == ["2", "3"]
    assert not published_objects(f"{run_url}/snapshots/k/1/**")  # every file of it gone
    assert newest_snapshot_metadata(run_url, "k")["examples_seen"] == 30
    # A version fetched from the store is the model that was written.
    local = fetch_version(versions[-1], tmp_path / "cache")
    assert read_metadata(local)["version"] == 3
    rows = np.eye(8, dtype=np.float32)[:4]
    np.testing.assert_allclose(
        vae.load(local).encode(rows)[0], model.posterior(rows).mean().numpy(), rtol=1e-5
    )


def test_a_version_is_published_with_saved_model_pb_last_and_pruned_with_it_first(
    run_url, tmp_path, monkeypatch
):
    model = _trainer(steps=1).model
    events: list[tuple[str, str]] = []
    write, delete = run_mirror._write_object, run_mirror._delete

    def recorded_write(url: str, data: bytes) -> None:
        events.append(("put", url))
        write(url, data)

    def recorded_delete(urls: list[str]) -> None:
        events.extend(("delete", url) for url in urls)
        delete(urls)

    monkeypatch.setattr(run_mirror, "_write_object", recorded_write)
    monkeypatch.setattr(run_mirror, "_delete", recorded_delete)
    writer = SnapshotWriter(tmp_path, "k", keep=1, mirror=RunMirror(run_url, tmp_path))
    writer.write(model, {"examples_seen": 1})
    writer.write(model, {"examples_seen": 2})
    root = f"{run_url}/snapshots/k/"
    for version in ("1", "2"):
        puts = [url for kind, url in events if kind == "put" and url.startswith(root + version)]
        assert len(puts) == 5 and puts[-1] == f"{root}{version}/saved_model.pb", puts
    deletes = [url for kind, url in events if kind == "delete"]
    assert deletes[0] == f"{root}1/saved_model.pb" and len(deletes) == 5, deletes
    # Version 1 was withdrawn only after version 2 was whole.
    assert events.index(("put", f"{root}2/saved_model.pb")) < events.index(("delete", deletes[0]))


def test_pollers_never_load_a_partial_version_while_versions_are_written(run_url, tmp_path):
    model = _trainer(steps=1).model
    work = tmp_path / "work"
    writer = SnapshotWriter(work, "k", keep=2, mirror=RunMirror(run_url, work))
    writer.write(model, {"examples_seen": 0})
    model_url = f"{run_url}/snapshots/k"
    # The scoring job's poller (`aevb score --model s3://...`), checking at every call.
    followed = SnapshotModelHandler(model_url, follow=True, poll_interval_seconds=0).load_model()
    done, errors = threading.Event(), []
    loaded: list[int] = []
    followed_versions: list[int] = []
    new_version = threading.Condition()

    def poll() -> None:  # strict: a listed version that fails to load fails the test
        try:
            while not done.is_set():
                newest = published_versions(model_url)[-1]  # listed on and on, writes or not
                if loaded and newest.endswith(f"/{loaded[-1]}"):
                    continue
                local = fetch_version(newest, tmp_path / "cache")
                vae.load(local)  # raises on a partial SavedModel
                followed_versions.append(followed.current().version)
                with new_version:
                    loaded.append(int(local.name))
                    new_version.notify()
        except Exception as error:  # failed in the thread: reported by the test
            errors.append(error)
            with new_version:
                new_version.notify()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for version in range(2, 7):
            writer.write(model, {"examples_seen": version})
            # The next write waits for the poller to take this one: each write is listed
            # through, and no version is pruned before the poller has fetched it.
            with new_version:
                new_version.wait_for(lambda v=version: v in loaded or errors, timeout=120)
    finally:
        done.set()
        poller.join()
    assert not errors, errors
    assert loaded == [1, 2, 3, 4, 5, 6]
    # The job's poller lists on its own: it may be ahead of ours, never behind, never back.
    assert followed_versions == sorted(followed_versions) and followed_versions[-1] == 6
    assert all(mine >= theirs for mine, theirs in zip(followed_versions, loaded, strict=True))


def test_worker_json_lines_are_published_to_the_store_and_read_back(run_url):
    directory = f"{run_url}/dead_letter"
    writer = WorkerJsonLines(directory, "dead_letter")
    writer.write({"reason": "a"})  # the first line is published at once
    assert read_json_lines(directory, "dead_letter") == [{"reason": "a"}]
    writer.write({"reason": "b"})  # within LOG_PUBLISH_SECONDS: in the working copy only
    assert len(read_json_lines(directory, "dead_letter")) == 1
    writer.flush()
    assert read_json_lines(directory, "dead_letter") == [{"reason": "a"}, {"reason": "b"}]
    writer.close()


def _aevb(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(AEVB), *args], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stderr


def _write_keyed_rows(path: pathlib.Path, rows: np.ndarray, keys: tuple[str, ...]) -> None:
    with path.open("w") as handle:
        for i, row in enumerate(rows):
            record = {"x": [round(float(v), 3) for v in row], "key": keys[i % len(keys)]}
            handle.write(json.dumps(record) + "\n")
        handle.write("not a JSON line\n")  # a dead letter


def json_records(path: pathlib.Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


@pytest.mark.slow
def test_a_two_worker_training_job_writes_its_run_directory_to_the_store_and_resumes(
    endpoint, run_url, tmp_path
):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    digits = load_dataset("mnist").train
    _write_keyed_rows(incoming / "first.jsonl", digits[:400], ("tenant-a", "tenant-b"))
    job = (
        f"--source=files:{incoming}/*.jsonl",
        "--dataset=mnist",
        "--hidden=50",
        "--latent-dim=5",
        "--batch-size=20",
        "--log-every-steps=1",
        f"--output={run_url}",
        f"--s3_endpoint_url={endpoint}",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    )
    # The workers reach the store by the job's flags, and the credentials in their environment.
    _aevb("train", *job, env=S3_TEST_CREDENTIALS)
    test_rows = load_dataset("mnist").test[:500]
    for key in ("tenant-a", "tenant-b"):
        assert saved_state(run_url, key)["examples_seen"] == 200
        newest = fetch_version(published_versions(f"{run_url}/snapshots/{key}")[-1], tmp_path / "c")
        untrained = vae.evaluate(vae.VAE(vae.load(newest).config), test_rows).elbo
        bound = float(np.mean(vae.load(newest).elbo(test_rows)))
        assert bound > untrained + 150, (bound, untrained)  # about -230 against -543
    letters = read_json_lines(f"{run_url}/dead_letter", "dead_letter")
    assert [letter["reason"] for letter in letters] == ["non_numeric"]
    progress = [
        json.loads(line)
        for url in published_objects(f"{run_url}/progress-*.jsonl")
        for line in run_mirror.read_object(url).decode().splitlines()
    ]
    assert {entry["key"] for entry in progress} == {"tenant-a", "tenant-b"}

    # A restart (a new process, on the local runner's in-process worker: an empty working
    # copy) with a new file trains only that file's records, on from the published checkpoints.
    _write_keyed_rows(incoming / "second.jsonl", digits[400:500], ("tenant-a", "tenant-b"))
    _aevb("train", *job[:-2], env=S3_TEST_CREDENTIALS)
    for key in ("tenant-a", "tenant-b"):
        assert saved_state(run_url, key)["examples_seen"] == 250
        assert newest_snapshot_metadata(run_url, key)["examples_seen"] == 250
    letters = read_json_lines(f"{run_url}/dead_letter", "dead_letter")
    assert len(letters) == 2  # the first file's is not written again

    # `aevb score` reads a model from the store: the scores of its newest version.
    scores = tmp_path / "scores"
    model_url = f"{run_url}/snapshots/tenant-a"
    _aevb(
        "score",
        f"--source=files:{incoming}/second.jsonl",
        f"--model={model_url}",
        f"--output={scores}",
        f"--s3_endpoint_url={endpoint}",
        env=S3_TEST_CREDENTIALS,
    )
    newest = vae.load(fetch_version(published_versions(model_url)[-1], tmp_path / "c"))
    scored = sorted(read_scores(scores), key=lambda s: s["position"])
    assert len(scored) == 100
    records = json_records(incoming / "second.jsonl")
    for key in ("tenant-a", "tenant-b"):  # each key's records come as one chunk, in order
        rows = np.array([r["x"] for r in records if r["key"] == key], np.float32)
        expected = -newest.elbo(rows)  # the bound's noise depends on a row's place in its batch
        got = [s["score"] for s in scored if s["key"] == key]
        np.testing.assert_allclose(got, expected, rtol=1e-5)

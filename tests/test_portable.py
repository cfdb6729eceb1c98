"""The jobs on Prism, Beam's portable runner. `aevb train` and `aevb score` submitted with
`--runner PortableRunner` to a Prism job server (started here as its own process, as a Flink
job server would be) give the outputs they give on the local `FnApiRunner`: the same
snapshot (bound within 1e-4 nats), the same dead letters, the same scores. A streaming
`aevb score --runner PrismRunner` follows a new snapshot version in real time and drains on
Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from services import needed

import vae
from benchmarks.services import free_port, prism_flags, service_path, stop
from pipeline.ingest.datasets import load_dataset
from pipeline.outputs.scores import read_scores
from vae.snapshot_format import read_metadata, version_directories

AEVB = pathlib.Path(sys.executable).parent / "aevb"
EXAMPLES = 1_000

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def prism_job_server(log: pathlib.Path) -> Iterator[str]:
    """Prism serving Beam's job API on loopback; yields its endpoint."""
    port, prism = free_port(), needed(lambda: service_path("prism"))
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(prism), f"--job_port={port}", "--serve_http=false"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while "Serving JobManagement" not in log.read_text():
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            yield f"localhost:{port}"
        finally:
            stop(server)


def _aevb(*args: str) -> None:
    done = subprocess.run([str(AEVB), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _dead_letters(run: pathlib.Path) -> list[tuple]:
    paths = sorted((run / "dead_letter").glob("*.jsonl"))
    letters = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    return sorted((d["reason"], d["origin"], json.dumps(d["position"])) for d in letters)


def test_train_and_score_on_a_portable_job_server_match_the_local_runner(
    tmp_path: pathlib.Path,
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    np.save(incoming / "digits.npy", load_dataset("mnist").train[:EXAMPLES])
    np.save(incoming / "too-wide.npy", np.zeros((3, 785), np.float32))  # dead letters
    source = f"--source=files:{incoming}/*.npy"
    model = ("--dataset=mnist", "--hidden=50", "--latent-dim=5")
    with prism_job_server(tmp_path / "prism.log") as endpoint:
        portable = ("--runner=PortableRunner", f"--job_endpoint={endpoint}")
        portable += ("--environment_type=LOOPBACK",)
        runners = {"local": (), "portable": portable}
        for name, flags in runners.items():
            _aevb("train", source, *model, f"--output={tmp_path / name}", *flags)
            snapshots = tmp_path / name / "snapshots" / "default"
            _aevb(
                "score",
                source,
                f"--model={snapshots}",
                f"--output={tmp_path / name}-scores",
                *flags,
            )
    test_rows = load_dataset("mnist").test[:500]
    bounds, scores = {}, {}
    for name in runners:
        newest = version_directories(tmp_path / name / "snapshots" / "default")[-1]
        assert read_metadata(newest)["examples_seen"] == EXAMPLES
        bounds[name] = float(np.mean(vae.load(newest).elbo(test_rows)))
        scores[name] = sorted(
            (s["source"], json.dumps(s["position"]), round(s["score"], 3))
            for s in read_scores(tmp_path / f"{name}-scores")
        )
    assert bounds["portable"] == pytest.approx(bounds["local"], abs=1e-4)
    assert _dead_letters(tmp_path / "portable") == _dead_letters(tmp_path / "local")
    assert len(_dead_letters(tmp_path / "local")) == 3  # a row of 785 values is one
    assert scores["portable"] == scores["local"] and len(scores["local"]) == EXAMPLES


def test_a_streaming_score_job_on_prism_follows_a_new_version_and_drains_on_ctrl_c(
    tmp_path: pathlib.Path,
) -> None:
    run, incoming, out = tmp_path / "run", tmp_path / "incoming", tmp_path / "scores"
    incoming.mkdir()
    model = ("--dataset=mnist", "--hidden=50", "--latent-dim=5", f"--output={run}")
    _aevb("train", *model, "--max-examples=1000")
    rows = load_dataset("mnist").test

    def drop(name: str, data: np.ndarray) -> None:
        with (incoming / f"{name}.tmp").open("wb") as staging:  # outside the glob
            np.save(staging, data)
        os.rename(incoming / f"{name}.tmp", incoming / f"{name}.npy")

    def scored(count: int) -> list[dict]:
        deadline = time.monotonic() + 120
        while len(records := read_scores(out) if out.exists() else []) < count:
            assert score.poll() is None, (tmp_path / "score.log").read_text()[-5000:]
            assert time.monotonic() < deadline, f"{len(records)} of {count} scored"
            time.sleep(0.5)
        return records

    with (tmp_path / "score.log").open("w") as log:
        score = subprocess.Popen(
            [
                *(str(AEVB), "score", "--streaming", f"--source=files:{incoming}/*.npy"),
                *(f"--model={run}/snapshots/default", "--model-poll-seconds=1"),
                *("--poll-interval-seconds=0.5", "--file-settle-seconds=0.5", f"--output={out}"),
                *needed(prism_flags),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            drop("first", rows[:200])
            assert {r["model_version"] for r in scored(200)} == {1}
            _aevb("train", *model, "--max-examples=2000")  # version 2, while it runs
            time.sleep(2)  # two model polls
            drop("second", rows[200:400])
            versions = {(pathlib.Path(r["source"]).name, r["model_version"]) for r in scored(400)}
            assert versions == {("first.npy", 1), ("second.npy", 2)}
            score.send_signal(signal.SIGINT)
            assert score.wait(timeout=120) == 0, (tmp_path / "score.log").read_text()[-5000:]
        finally:
            if score.poll() is None:
                score.kill()
    assert "stop requested: draining" in (tmp_path / "score.log").read_text()

"""The same jobs on a portable runner: `aevb train` and `aevb score` submitted with
`--runner PortableRunner` to Prism, Beam's portable job server (started here as its own
process, as a Flink job server would be), give the outputs they give on the local
`FnApiRunner`: the same snapshot (bound within 1e-4 nats), the same dead letters, the same
scores.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from services import needed

import vae
from benchmarks.services import free_port, service_path
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
            server.terminate()
            server.wait(timeout=30)


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

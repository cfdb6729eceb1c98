"""End to end through a real Kafka broker: `aevb produce` replays MNIST into a topic, a
streaming `aevb train --source kafka:...` trains from it on Prism, Beam's portable runner,
with Beam's Java KafkaIO (cross-language, through the expansion service `make services`
assembles). Message keys are model keys; a malformed message is a dead letter; a restarted
job goes on from the offsets the first one committed instead of reading the topic again.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from services import needed

import vae
from benchmarks.services import expansion_service_jar, kafka_broker, prism_flags, service_path
from pipeline.ingest.datasets import load_dataset
from pipeline.train.checkpoints import CheckpointStore
from vae.snapshot_format import read_metadata, version_directories

AEVB = pathlib.Path(sys.executable).parent / "aevb"
TOPIC = "digits"
PER_KEY = 600  # examples per model key in the first run
LATER = 400  # examples of a new key, produced before the restart

pytestmark = pytest.mark.slow


def _aevb(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(AEVB), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stderr


def _produce(bootstrap: str, key: str, examples: int, seed: int) -> None:
    _aevb(
        *("produce", "--bootstrap", bootstrap, "--topic", TOPIC, "--dataset", "mnist"),
        *("--key", key, "--max-examples", str(examples), "--seed", str(seed)),
    )


def _train(bootstrap: str, run: pathlib.Path, records: int) -> str:
    """A streaming job reading `records` messages of the topic (its bound: the job ends)."""
    return _aevb(
        *("train", "--streaming", "--source", f"kafka:{bootstrap}/{TOPIC}"),
        *("--dataset", "mnist", "--hidden", "50", "--latent-dim", "5"),
        *("--max-examples", str(records), "--output", str(run)),
        *("--kafka-expansion-service", str(needed(expansion_service_jar))),
        *needed(prism_flags),
    )


def _examples_seen(run: pathlib.Path, key: str) -> int:
    state = json.loads((run / "checkpoints" / key / "state.json").read_text())
    return state["examples_seen"]


def _dead_letters(run: pathlib.Path) -> list[dict]:
    paths = sorted((run / "dead_letter").glob("*.jsonl"))
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def test_a_streaming_job_trains_a_model_per_message_key_and_resumes_from_committed_offsets(
    tmp_path: pathlib.Path,
) -> None:
    from kafka import KafkaProducer  # the kafka extra, installed by `make install`

    run = tmp_path / "run"
    needed(expansion_service_jar)
    needed(lambda: service_path("kafka"))
    with kafka_broker(tmp_path / "broker") as bootstrap:
        for seed, key in enumerate(("tenant-a", "tenant-b")):
            _produce(bootstrap, key, PER_KEY, seed)
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        producer.send(TOPIC, key=b"tenant-a", value=b"0.5,not-a-number")
        producer.flush()

        _train(bootstrap, run, 2 * PER_KEY + 1)

        test_rows = load_dataset("mnist").test[:500]
        config = CheckpointStore.saved_config(run / "checkpoints" / "tenant-a")
        untrained = vae.evaluate(vae.VAE(config), test_rows).elbo  # about -543 nats
        for key in ("tenant-a", "tenant-b"):
            assert _examples_seen(run, key) == PER_KEY
            newest = version_directories(run / "snapshots" / key)[-1]
            assert read_metadata(newest)["examples_seen"] == PER_KEY
            # A model that learned from the messages: far above an untrained one's bound.
            bound = float(np.mean(vae.load(newest).elbo(test_rows)))
            assert bound > untrained + 150, (bound, untrained)
        (letter,) = _dead_letters(run)
        assert letter["source"] == f"kafka:{bootstrap}/{TOPIC}"
        assert letter["reason"] == "non_numeric" and "not-a-number" in letter["record"]

        # New messages, of a new key, then a restart: it reads only those.
        _produce(bootstrap, "tenant-c", LATER, seed=2)
        _train(bootstrap, run, LATER)
        assert _examples_seen(run, "tenant-c") == LATER
        assert _examples_seen(run, "tenant-a") == _examples_seen(run, "tenant-b") == PER_KEY
        assert len(_dead_letters(run)) == 1

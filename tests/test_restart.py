"""A restarted job continues where its checkpoints are: the records of its files that the
restored models already learned from are not trained again, and no dead letter is written
twice -- after a clean end, and after kill -9 at random moments."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from shared_data import SHARED, needs_data

from pipeline.ingest.decode import content_origin
from pipeline.train.read_ledger import ReadLedger

D = 8
TINY = ["--hidden=8", "--latent-dim=2", "--batch-size=10", f"--input-dim={D}"]


def _aevb(run: pathlib.Path, inbox: pathlib.Path, *flags: str) -> list[str]:
    return [
        str(pathlib.Path(sys.executable).parent / "aevb"),
        "train",
        f"--source=files:{inbox}/*",
        "--likelihood=bernoulli",
        f"--output={run}",
        *TINY,
        *flags,
    ]


def _write_files(inbox: pathlib.Path, count: int, rows: int, first: int = 0) -> int:
    """`count` files of `rows` records each, one of them bad per file; returns valid rows."""
    inbox.mkdir(exist_ok=True)
    rng = np.random.default_rng(first)
    for index in range(first, first + count):
        data = (rng.random((rows, D)) > 0.5).astype(int)
        lines = [",".join(map(str, row)) for row in data]
        lines[index % rows] = "0,1,oops" + ",0" * (D - 3)  # one dead letter per file
        (inbox / f"part-{index:03d}.csv").write_text("\n".join(lines) + "\n")
    return count * (rows - 1)


def _examples_seen(run: pathlib.Path) -> int:
    return json.loads((run / "checkpoints" / "default" / "state.json").read_text())["examples_seen"]


def _dead_letters(run: pathlib.Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((run / "dead_letter").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def _last_examples_seen(progress: pathlib.Path) -> int:
    complete_lines = progress.read_text().split("\n")[:-1]  # a kill can cut the last one
    return json.loads(complete_lines[-1])["examples"]


def _run(argv: list[str]) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_restarted_batch_job_trains_only_what_is_new(tmp_path: pathlib.Path) -> None:
    inbox, run = tmp_path / "inbox", tmp_path / "run"
    valid = _write_files(inbox, count=4, rows=50)
    _run(_aevb(run, inbox))
    assert _examples_seen(run) == valid
    letters = _dead_letters(run)
    assert len(letters) == 4
    _run(_aevb(run, inbox))  # nothing new: nothing trained, no letter written again
    assert _examples_seen(run) == valid and _dead_letters(run) == letters
    more = _write_files(inbox, count=2, rows=50, first=4)
    _run(_aevb(run, inbox))  # two new files: exactly their records
    assert _examples_seen(run) == valid + more
    assert len(_dead_letters(run)) == 6
    # A copy under another name is another file: it trains (a file per epoch repeats data).
    (inbox / "copy.csv").write_bytes((inbox / "part-000.csv").read_bytes())
    _run(_aevb(run, inbox))
    assert _examples_seen(run) == valid + more + 49 and len(_dead_letters(run)) == 7


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_copies_under_other_names_each_train_and_a_restart_trains_none_again(
    tmp_path: pathlib.Path,
) -> None:
    # Rows of one file wait in Beam state for a minibatch while its copies arrive (M = 10
    # does not divide the 49 valid rows of a file): each file's records train once.
    inbox, run = tmp_path / "inbox", tmp_path / "run"
    valid = _write_files(inbox, count=1, rows=50)
    for name in ("twin-a.csv", "twin-b.csv"):
        (inbox / name).write_bytes((inbox / "part-000.csv").read_bytes())
    _run(_aevb(run, inbox))
    assert _examples_seen(run) == 3 * valid and len(_dead_letters(run)) == 3
    _run(_aevb(run, inbox))
    assert _examples_seen(run) == 3 * valid and len(_dead_letters(run)) == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_at_random_moments_then_restart_trains_every_record_once(
    tmp_path: pathlib.Path,
) -> None:
    inbox, run = tmp_path / "inbox", tmp_path / "run"
    files = 60
    valid = _write_files(inbox, count=files, rows=400)
    rng = np.random.default_rng(7)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    streaming = _aevb(run, inbox, "--streaming", "--checkpoint-every-steps=7")
    progress = run / "progress.jsonl"
    kills = 0
    for _ in range(3):
        if progress.exists() and _last_examples_seen(progress) == valid:
            break  # everything trained: a job started now would have nothing to log
        job = subprocess.Popen(
            streaming, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        seen_before = progress.read_text().count("\n") if progress.exists() else 0
        deadline = time.monotonic() + 120
        # Killed once it trains again (a new progress line), after a random further while.
        while time.monotonic() < deadline and job.poll() is None:
            if progress.exists() and progress.read_text().count("\n") > seen_before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            kills += 1
        job.wait(timeout=60)
    assert kills >= 2, "the job finished before it could be killed: give it more to read"
    _run(_aevb(run, inbox))  # a batch run reads the folder to its end
    assert _examples_seen(run) == valid  # every valid record once: none lost, none twice
    ledger_files = list((run / "checkpoints" / "default").glob("read_ledger-*.json"))
    newest = max(ledger_files, key=lambda path: int(path.stem.split("-")[1]))
    # Each file's lines (1-based) trained exactly: all but its bad line.
    expected = {}
    for index in range(files):
        path = inbox / f"part-{index:03d}.csv"
        bad = index % 400 + 1
        spans = [[1, bad], [bad + 1, 401]]
        expected[content_origin(str(path), path.read_bytes())] = [
            span for span in spans if span[0] < span[1]
        ]
    assert ReadLedger.from_dict(json.loads(newest.read_text())).to_dict() == expected
    letters = _dead_letters(run)
    assert len(letters) == files
    assert len({(x["source"], x["position"]) for x in letters}) == files


def _drift_lines(run: pathlib.Path) -> list[dict]:
    lines = (run / "progress.jsonl").read_text().splitlines()
    return [entry["drift"] for entry in map(json.loads, lines) if "drift" in entry]


@needs_data
@pytest.mark.timeout(300)
def test_a_job_killed_after_its_warm_up_detects_a_later_shift_as_if_it_never_stopped(
    tmp_path: pathlib.Path,
) -> None:
    """The drift detectors' state is in the checkpoint: a job killed (-9) less than a
    warm-up before an abrupt shift and restarted finds it where an uninterrupted job does,
    with the same statistic. Detectors starting afresh would still be warming up then."""
    shift = 20_000
    flags = [
        str(pathlib.Path(sys.executable).parent / "aevb"),
        "train",
        "--dataset=mnist",
        f"--data-dir={SHARED}",
        "--drift=abrupt",
        f"--phase-examples={shift}",
        f"--max-examples={shift + 4000}",
        "--hidden=32",
        "--latent-dim=4",
        "--checkpoint-every-steps=5",
        "--log-every-steps=5",
    ]
    _run([*flags, f"--output={tmp_path / 'uninterrupted'}"])
    expected = _drift_lines(tmp_path / "uninterrupted")
    assert expected and shift < expected[0]["examples_seen"] <= shift + 2000

    run = tmp_path / "killed"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # Slowed down so that the kill lands in the 2,000 examples before the shift (20
    # minibatches: less than the detectors' warm-up of 30).
    killed = [*flags, f"--output={run}", "--examples-per-second=2000"]
    job = subprocess.Popen(killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoints" / "default" / "state.json"
    try:
        deadline = time.monotonic() + 120
        while not (state.exists() and _examples_seen(run) >= shift - 2000):
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job never reached the kill point"
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    assert shift - 2000 <= _examples_seen(run) < shift, "killed too late to tell"
    assert _drift_lines(run) == []
    _run([*flags, f"--output={run}"])
    found = _drift_lines(run)
    assert [(d["examples_seen"], d["statistic"]) for d in found] == [
        (d["examples_seen"], d["statistic"]) for d in expected
    ]

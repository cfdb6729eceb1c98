"""Faults a user meets, each answered by one clear line and exit status 2, never a traceback:
a run directory another job holds, a metrics port in use, a damaged snapshot, a batch glob
that matches nothing."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import pytest

import vae
from pipeline.cli.main import main
from pipeline.jobs.run_lock import RunDirectoryBusy, RunDirectoryLock
from pipeline.train.snapshots import SnapshotWriter
from vae.snapshot_format import read_metadata

SMALL = ["--dataset", "mnist-5k", "--hidden", "8", "--latent-dim", "2", "--max-examples", "200"]


def _error_line(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def held_run_dir(tmp_path: pathlib.Path):
    """A run directory whose lock another process holds, until it is killed with -9."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.jobs.run_lock import RunDirectoryLock; "
            "RunDirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield run, holder
    holder.kill()
    holder.wait(timeout=30)


def test_a_second_job_on_a_run_directory_is_refused_until_the_first_dies(
    held_run_dir, capsys: pytest.CaptureFixture
) -> None:
    run, holder = held_run_dir
    assert main(["train", *SMALL, "--output", str(run)]) == 2
    line = _error_line(capsys)
    assert f"{run} is in use by another job (process {holder.pid})" in line
    assert not (run / "checkpoints").exists() and not (run / "progress.jsonl").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    RunDirectoryLock(run).acquire().release()  # the OS released the dead job's lock


def test_a_scoring_job_on_a_held_output_is_refused(
    held_run_dir, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
    out, _ = held_run_dir
    model_dir = SnapshotWriter(tmp_path, "default").write(
        vae.VAE(vae.VAEConfig(input_dim=784, latent_dim=2, hidden_dim=8)), {}
    )
    argv = ["score", "--model", str(model_dir), "--dataset", "mnist-5k", "--output", str(out)]
    assert main(argv) == 2
    assert "is in use by another job" in _error_line(capsys)


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: pathlib.Path) -> None:
    with RunDirectoryLock(tmp_path), pytest.raises(RunDirectoryBusy):
        RunDirectoryLock(tmp_path).acquire()


def test_a_metrics_port_in_use_is_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["train", "--streaming", *SMALL, "--metrics-port", str(port)]
        assert main([*argv, "--output", str(tmp_path / "run")]) == 2
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in _error_line(capsys)


def test_a_batch_glob_matching_nothing_is_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["train", "--source", f"files:{tmp_path}/none/*.npy", "--input-dim", "784"]
    assert main([*argv, "--output", str(tmp_path / "run")]) == 2
    assert "no files match" in _error_line(capsys)


@pytest.mark.parametrize("damage", ["variables", "graph"])
@pytest.mark.parametrize("command", ["evaluate", "score"])
def test_a_damaged_snapshot_is_one_line(
    damage: str, command: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
    config = vae.VAEConfig(input_dim=784, latent_dim=2, hidden_dim=8)
    version = SnapshotWriter(tmp_path / "run", "default").write(vae.VAE(config), {})
    if damage == "variables":
        shutil.rmtree(version / "variables")
    else:
        graph = version / "saved_model.pb"
        graph.write_bytes(graph.read_bytes()[:200])
    argv = [command, "--model", str(version), "--dataset", "mnist-5k"]
    if command == "score":
        argv += ["--output", str(tmp_path / "scores")]
    assert main(argv) == 2
    assert f"--model {version} is not a readable snapshot" in _error_line(capsys)


def test_a_job_removes_what_interrupted_writes_left_and_keeps_the_rest(
    tmp_path: pathlib.Path,
) -> None:
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--output", str(run)]) == 0
    staging = run / "snapshots" / ".staging"
    keys = run / "checkpoints" / "default"
    # What a job killed mid-write (or by a full disk) leaves behind.
    leftovers = [
        staging / "default-7-abc123",
        staging / "pruned-x1y2",
        keys / "ckpt-9_temp",
    ]
    for directory in leftovers:
        (directory / "inner").mkdir(parents=True)
        (directory / "inner" / "part").write_bytes(b"\0" * 100)
    (keys / "state.json.tmp").write_text('{"step": ')
    assert main(["train", *SMALL, "--max-examples", "300", "--output", str(run)]) == 0
    assert not any(p.exists() for p in [*leftovers, keys / "state.json.tmp"])
    # The record of versions used and the checkpoint were kept: the job resumed at 200.
    newest = max(int(p.name) for p in (run / "snapshots" / "default").iterdir())
    assert int((staging / "default.last_version").read_text()) == newest
    assert json.loads((keys / "state.json").read_text())["examples_seen"] == 300
    assert read_metadata(run / "snapshots" / "default" / str(newest))["examples_seen"] == 300


@pytest.fixture
def small_disk(tmp_path: pathlib.Path):
    """A 1.2 MB file system of its own (tmpfs; needs root, as CI runs)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_disk_is_one_line_and_the_job_resumes_once_there_is_room(small_disk) -> None:
    run = small_disk / "run"
    argv = [
        str(pathlib.Path(sys.executable).parent / "aevb"),
        "train",
        *SMALL,
        "--hidden=50",
        "--max-examples=20000",
        "--snapshot-every-examples=2000",
        f"--output={run}",
    ]
    full = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    errors = [line for line in full.stderr.splitlines() if line.startswith("aevb train: error:")]
    assert full.returncode == 1, full.stderr[-2000:]
    assert len(errors) == 1 and "no space left on device" in errors[0], errors
    # Neither Beam's reports of the failed bundles nor a traceback: that one line.
    assert "Traceback" not in full.stderr and " ERROR apache_beam" not in full.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        json.loads((run / "checkpoints" / "default" / "state.json").read_text())["examples_seen"]
        == 20000
    )
    # Nothing half-written is left: only the records of versions used and graph files.
    leftovers = [
        p
        for p in (run / "snapshots" / ".staging").iterdir()
        if p.suffix != ".last_version" and not p.match("saved_model-*.pb")
    ]
    assert not list(run.glob("checkpoints/*/*_temp")) and not leftovers

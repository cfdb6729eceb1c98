"""The README's `aevb report` example: a 2-D latent MNIST model whose stream changes.

A streaming `aevb train` watches a folder. It first gets 150,000 examples of the digits
0-4 (reshuffled passes), then, once it has trained them, 150,000 of the digits 5-9; the
drift detector fires at the switch. `aevb report` then draws the figures into
docs/figures/mnist-z2/ (bound, its terms with the drift mark, samples, manifold).

    .venv/bin/python benchmarks/drift_example.py [--output runs/mnist-z2-drift]
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from pipeline.ingest.datasets import load_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
AEVB = pathlib.Path(sys.executable).parent / "aevb"
PER_PHASE = 150_000


def _examples(progress: pathlib.Path) -> int:
    if not progress.exists():
        return 0
    lines = progress.read_text().splitlines()
    return max((json.loads(line).get("examples", 0) for line in lines if line), default=0)


def _wait_for(progress: pathlib.Path, examples: int, process: subprocess.Popen) -> None:
    while _examples(progress) < examples:
        if process.poll() is not None:
            sys.exit(f"aevb train exited with status {process.returncode}")
        time.sleep(1)


def _phase(data: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    passes = -(-PER_PHASE // len(data))
    return np.concatenate([data[rng.permutation(len(data))] for _ in range(passes)])[:PER_PHASE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, default=REPO / "runs" / "mnist-z2-drift")
    parser.add_argument("--figures", type=pathlib.Path, default=REPO / "docs/figures/mnist-z2")
    args = parser.parse_args()
    dataset = load_dataset("mnist", os.environ.get("AEVB_DATA_DIR") or None)
    inputs = args.output / "incoming"
    inputs.mkdir(parents=True, exist_ok=True)
    np.save(inputs / "1-digits-0-4.npy", _phase(dataset.train[dataset.train_labels < 5], 1))
    trainer = subprocess.Popen(
        [
            str(AEVB),
            "train",
            "--streaming",
            f"--source=files:{inputs}/*.npy",
            "--input-dim=784",
            "--likelihood=bernoulli",
            "--latent-dim=2",
            "--log-every-steps=20",
            f"--output={args.output}",
        ]
    )
    progress = args.output / "progress.jsonl"
    _wait_for(progress, PER_PHASE, trainer)
    staging = inputs / "2-digits-5-9.staging"  # outside the *.npy glob until complete
    with staging.open("wb") as handle:
        np.save(handle, _phase(dataset.train[dataset.train_labels >= 5], 2))
    os.rename(staging, inputs / "2-digits-5-9.npy")
    _wait_for(progress, 2 * PER_PHASE, trainer)
    trainer.send_signal(signal.SIGINT)  # drain: final checkpoint and snapshot
    trainer.wait()
    subprocess.run(
        [str(AEVB), "report", str(args.output), "--output", str(args.figures)], check=True
    )


if __name__ == "__main__":
    main()

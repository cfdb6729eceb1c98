"""How the drift detectors' defaults were chosen (docs/benchmarks.md, "Drift detection").

1. collect: the paper's 784-500-20 MNIST model trained from scratch on 10^6 examples in
   reshuffled passes (stationary), with the test-then-train bound of every example; at
   10^5 and 5*10^5 examples a copy of the trainer continues for 10^4 examples on inverted,
   rotated (90 degrees) and noisy (+N(0, 0.1^2), clipped) images; and a second model
   trained on digits 0-4 for 2*10^5 examples continues on digits 5-9. Then the other data
   sets we ship, each learned from scratch on 10^6 examples in reshuffled passes by the
   model `aevb train --dataset NAME` builds (Frey Face: 200 hidden units, as the paper):
   their false alarms say whether a default holds beyond MNIST.
2. evaluate: each detector setting replays those streams (one value per minibatch, as
   `pipeline.train.drift.DriftMonitor` is fed) and reports false alarms on the stationary run,
   false alarms on 10^7 examples of a flat bound (block bootstrap of the late run's
   detrended minibatch noise: the worst case, when the bound no longer improves), and the
   delay in examples from each switch to its detection (also for sustained rises of 10-40
   nats added to the learning run, and of 5-20 nats added to the flat bound).

    .venv/bin/python benchmarks/drift_thresholds.py collect --output runs/drift-thresholds  # ~6 min
    .venv/bin/python benchmarks/drift_thresholds.py evaluate --output runs/drift-thresholds
"""

import argparse
import itertools
import pathlib
import tempfile

import numpy as np

M = 100  # minibatch size of the measured model
SHIFTS = ("inverted", "rotated", "noise")
BRANCH_AT = (100_000, 500_000)
# The other data sets we ship, with the hidden units of their models.
OTHER_DATASETS = {"binarized-mnist": 500, "mnist-5k": 500, "frey": 200}


def collect(output: pathlib.Path) -> None:
    import vae
    from pipeline.ingest.datasets import load_dataset
    from pipeline.ingest.replay import replay_chunks

    dataset = load_dataset("mnist")
    train, labels = dataset.train, dataset.train_labels
    config = vae.VAEConfig()
    rng = np.random.default_rng(1)
    shifts = {
        "inverted": lambda x: 1.0 - x,
        "rotated": lambda x: np.rot90(x.reshape(-1, 28, 28), axes=(1, 2)).reshape(-1, 784),
        "noise": lambda x: np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32),
    }

    def feed(trainer, data, examples, seed):
        bounds = []
        for chunk in replay_chunks(data, 1000, max_examples=examples, seed=seed):
            for start in range(0, len(chunk), M):
                bounds.append(trainer.train_step(chunk[start : start + M]).elbo)
        return np.concatenate(bounds)

    def branch(trainer):
        path = trainer.checkpoint().save(tempfile.mkdtemp() + "/ckpt")
        copy = vae.Trainer(config)
        copy.checkpoint().restore(path)
        return copy

    output.mkdir(parents=True, exist_ok=True)
    trainer = vae.Trainer(config)
    stationary = []
    for chunk in replay_chunks(train, 1000, max_examples=10**6, seed=0):
        for start in range(0, len(chunk), M):
            stationary.append(trainer.train_step(chunk[start : start + M]).elbo)
        if trainer.examples_seen in BRANCH_AT:
            for name, shift in shifts.items():
                after = feed(branch(trainer), np.asarray(shift(train[:20000])), 10_000, 7)
                np.save(output / f"shift_{name}_{trainer.examples_seen}.npy", after)
    np.save(output / "stationary.npy", np.concatenate(stationary))
    trainer = vae.Trainer(config)
    np.save(output / "classes_pre.npy", feed(trainer, train[labels < 5], 200_000, 3))
    np.save(output / "classes_post.npy", feed(trainer, train[labels >= 5], 10_000, 4))
    for name, hidden in OTHER_DATASETS.items():
        other = load_dataset(name)
        trainer = vae.Trainer(
            vae.VAEConfig(input_dim=other.input_dim, likelihood=other.likelihood, hidden_dim=hidden)
        )
        np.save(output / f"stationary_{name}.npy", feed(trainer, other.train, 10**6, 0))


def _means(bounds: np.ndarray) -> np.ndarray:
    negative = -bounds.astype(np.float64)
    return negative[: len(negative) // M * M].reshape(-1, M).mean(axis=1)


def _detections(settings, values) -> list[int]:
    from pipeline.train.drift import DriftMonitor

    monitor = DriftMonitor(settings)
    found = []
    for i, value in enumerate(values):
        if monitor.update(float(value), examples_seen=M * (i + 1)):
            found.append(M * (i + 1))
    return found


def evaluate(output: pathlib.Path) -> None:
    from pipeline.train.drift import DriftSettings

    stationary = _means(np.load(output / "stationary.npy"))
    # The flat worst case: the late run's minibatch noise around a moving average,
    # resampled in blocks of 50 minibatches to 10^7 examples at a constant level.
    late = stationary[5000:]
    k = 201
    noise = late[k // 2 : -(k // 2)] - np.convolve(late, np.ones(k) / k, mode="valid")
    blocks = [noise[i : i + 50] for i in range(0, len(noise) - 50, 50)]
    picks = np.random.default_rng(0).integers(0, len(blocks), 2000)
    flat = 120.0 + np.concatenate([blocks[j] for j in picks])
    print(f"minibatch noise: sd {noise.std():.2f} nats, lag-1 autocorrelation "
          f"{np.corrcoef(noise[:-1], noise[1:])[0, 1]:.3f}")  # fmt: skip
    scenarios = []
    for name, at in itertools.product(SHIFTS, BRANCH_AT):
        after = _means(np.load(output / f"shift_{name}_{at}.npy"))
        scenarios.append(
            (f"{name}@{at // 1000}k", np.concatenate([stationary[: at // M], after]), at)
        )
    # A sustained rise of s nats added to the learning run itself (no model adaptation).
    for rise, at in itertools.product((10, 20, 40), (100_000, 500_000, 900_000)):
        values = stationary[: at // M + 100].copy()
        values[at // M :] += rise
        scenarios.append((f"run+{rise}@{at // 1000}k", values, at))
    # Early in training, where the detectors are weakest: steps of 40 and 100 nats and a
    # transient spike (+600 decaying to +40 within a few minibatches, as a fast-adapting
    # model shows) at 95 positions between 5,000 and 100,000 examples.
    early = {}
    for kind in ("+40", "+100", "spike"):
        for at in range(50, 1000, 10):
            values = stationary[: at + 60].copy()
            t = np.arange(60)
            values[at:] += {"+40": 40.0, "+100": 100.0, "spike": 40 + 560 * np.exp(-t / 3)}[kind]
            early.setdefault(kind, []).append((values, at * M))
    pre = _means(np.load(output / "classes_pre.npy"))
    post = _means(np.load(output / "classes_post.npy"))
    scenarios.append(("0-4>5-9@200k", np.concatenate([pre, post]), len(pre) * M))
    others = {
        name: _means(np.load(output / f"stationary_{name}.npy"))
        for name in OTHER_DATASETS
        if (output / f"stationary_{name}.npy").exists()
    }
    in_nats = {"units": "nats", "adwin_min_increase": 5.0}
    candidates = (
        [
            DriftSettings("page-hinkley", threshold=t, delta=d, **in_nats)
            for t, d in ((25, 1), (50, 1), (50, 2), (100, 2))
        ]
        + [DriftSettings("adwin", adwin_delta=a, **in_nats) for a in (0.002, 1e-4)]
        + [DriftSettings("both", threshold=50, delta=2, **in_nats)]
        + [
            DriftSettings("page-hinkley", threshold=t, delta=d)
            for t, d in ((10, 0.6), (12, 0.6), (15, 0.3), (15, 0.6), (20, 0.6))
        ]
        + [DriftSettings("adwin", adwin_min_increase=r) for r in (1.0, 1.5, 1.75, 2.0)]
        + [DriftSettings("both", threshold=t, adwin_min_increase=1.5) for t in (12, 15)]
        + [DriftSettings("both")]  # the default: 15, 0.6, 1.75
    )
    for settings in candidates:
        false_stationary = _detections(settings, stationary)
        false_others = {name: len(_detections(settings, v)) for name, v in others.items()}
        false_flat = _detections(settings, flat)
        delays = []
        for name, values, at in scenarios:
            after = [d for d in _detections(settings, values) if d > at]
            delays.append(f"{name} {after[0] - at if after else 'missed'}")
        name = settings.detector
        params = {
            "page-hinkley": f"threshold {settings.threshold:g}, delta {settings.delta:g}",
            "adwin": f"delta {settings.adwin_delta:g}, min rise {settings.adwin_min_increase:g}",
            "both": f"threshold {settings.threshold:g}, delta {settings.delta:g}, "
            f"min rise {settings.adwin_min_increase:g}",
        }[name] + f" {settings.units}"
        # Sensitivity where it is lowest: a sustained rise of s nats on the flat level.
        for rise in (5, 10, 20):
            waits = []
            for start in range(2000, 90_000, 8000):
                values = flat[: start + 100].copy()
                values[start:] += rise
                after = [d for d in _detections(settings, values) if d > start * M]
                waits.append(after[0] - start * M if after else None)
            found = [w for w in waits if w is not None]
            delays.append(
                f"flat+{rise} median {int(np.median(found)) if found else 'missed'}"
                f" ({len(found)}/{len(waits)} found)"
            )
        for kind, cases in early.items():
            late_ones = 0
            for values, at in cases:
                after = [d for d in _detections(settings, values) if d > at]
                late_ones += not after or after[0] - at > 2000
            delays.append(f"early {kind}: {late_ones}/{len(cases)} later than 2,000")
        print(
            f"{name} ({params}): false alarms {len(false_stationary)} on 10^6 stationary, "
            f"{len(false_flat)} on 10^7 flat, "
            + "".join(f"{count} on 10^6 of {other}, " for other, count in false_others.items())
            + f"delays: {', '.join(delays)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("collect", "evaluate"))
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("runs/drift"))
    args = parser.parse_args()
    (collect if args.step == "collect" else evaluate)(args.output)


if __name__ == "__main__":
    main()

"""PNG figures of a run, from its `progress.jsonl` and snapshots.

`bound_figure` draws the test-then-train bound and the test-set bound over the examples
seen (log scale, as the paper's Figure 2), optionally with the paper's reported values.
`parts_figure` draws the bound and its two terms (reconstruction, KL) over the examples
seen, with the drift detections progress.jsonl records as vertical lines. For image
models, `samples_figure` shows decoder means of random z ~ N(0, I) (the paper's Figure 5)
and, when the latent space is 2-D, `manifold_figure` the learned data manifold: decoder
means over a grid of z through the inverse Gaussian CDF (the paper's Figure 4).

>>> entries = [{"examples": n, "elbo": -200 + n / 1e4} for n in (1000, 2000, 4000)]
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "bound.png"
>>> bound_figure(entries, path).exists()
True
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt

# Kingma & Welling (2014), Figure 2, N_z = 20, read off the plot: (examples, bound, split).
PAPER_REFERENCE = {
    "mnist": [(1e6, -125.0, "test"), (1e7, -105.0, "test")],
    "frey": [(1e8, 1490.0, "train"), (1e8, 1310.0, "test")],
}


def bound_figure(
    entries: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "Variational lower bound",
    paper: str | None = None,
) -> pathlib.Path:
    """Bound per example (nats) against examples seen; returns the PNG's path."""
    path = pathlib.Path(path)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    online = [e for e in entries if "elbo" in e]
    axes.plot(
        [e["examples"] for e in online],
        [e["elbo"] for e in online],
        lw=0.8,
        alpha=0.7,
        label="test-then-train bound (each minibatch before its update)",
    )
    tested = [e for e in entries if "test_elbo" in e]
    if tested:
        axes.plot(
            [e["examples"] for e in tested],
            [e["test_elbo"] for e in tested],
            lw=1.8,
            label="test-set bound",
        )
    _mark_drift(axes, entries)
    for examples, value, split in PAPER_REFERENCE.get(paper or "", []):
        axes.scatter([examples], [value], marker="*", s=140, zorder=5, color="black")
        axes.annotate(
            f"paper {split}: {value:+.0f}",
            (examples, value),
            textcoords="offset points",
            xytext=(-100, 6),
            fontsize=8,
        )
    axes.set_xscale("log")
    axes.set_xlabel("training examples seen")
    axes.set_ylabel("bound per example (nats)")
    axes.set_title(title)
    values = [e["elbo"] for e in online] + [e["test_elbo"] for e in tested]
    if values:
        # The first minibatches sit hundreds of nats below the rest; start where it is readable.
        ordered = sorted(values)
        axes.set_ylim(
            bottom=ordered[len(ordered) // 100], top=max(values) + 0.05 * abs(max(values))
        )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def drift_positions(entries: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """(model key, examples seen) of every drift detection in progress entries.

    >>> drift_positions([{"examples": 5}, {"key": "a", "examples": 7, "drift": {}}])
    [('a', 7)]
    """
    return [(e.get("key", "default"), e["examples"]) for e in entries if "drift" in e]


def change_points(entries: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    """(start, name) of every phase after the first in a recorded drift schedule.

    >>> change_points([{"drift_schedule": {"phases": [{"start": 0, "name": "a"},
    ...                                               {"start": 9, "name": "b"}]}}])
    [(9, 'b')]
    """
    points = []
    for entry in entries:
        if "drift_schedule" in entry:
            phases = entry["drift_schedule"]["phases"]
            points += [(phase["start"], phase["name"]) for phase in phases[1:]]
    return points


def _mark_drift(axes, entries: Sequence[dict[str, Any]]) -> None:
    for index, (start, name) in enumerate(change_points(entries)):
        axes.axvline(
            start,
            color="black",
            lw=1.0,
            ls=":",
            alpha=0.8,
            label="true change (scenario)" if index == 0 else None,
        )
        axes.annotate(
            name,
            (start, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="bottom",
            ha="right",
        )
    for index, (_key, examples) in enumerate(drift_positions(entries)):
        axes.axvline(
            examples,
            color="crimson",
            lw=1.0,
            ls="--",
            alpha=0.8,
            label="drift detected" if index == 0 else None,
        )


def parts_figure(
    entries: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "Bound and its terms",
) -> pathlib.Path:
    """Bound, reconstruction log-likelihood and KL (nats per example) against examples
    seen, one line per model key, drift detections as dashed vertical lines."""
    path = pathlib.Path(path)
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6.5), dpi=120, sharex=True, height_ratios=(2, 1)
    )
    logged = [e for e in entries if "elbo" in e]
    keys = sorted({e.get("key", "default") for e in logged})
    for key in keys:
        own = [e for e in logged if e.get("key", "default") == key]
        suffix = f" ({key})" if len(keys) > 1 else ""
        x = [e["examples"] for e in own]
        top.plot(x, [e["elbo"] for e in own], lw=0.9, label=f"bound{suffix}")
        if all("reconstruction_log_likelihood" in e for e in own):
            top.plot(
                x,
                [e["reconstruction_log_likelihood"] for e in own],
                lw=0.9,
                alpha=0.8,
                label=f"reconstruction log-likelihood{suffix}",
            )
        if all("kl" in e for e in own):
            bottom.plot(x, [e["kl"] for e in own], lw=0.9, label=f"KL(q(z|x) || p(z)){suffix}")
    for axes in (top, bottom):
        _mark_drift(axes, entries)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize=8)
    values = sorted(
        e[name] for e in logged for name in ("elbo", "reconstruction_log_likelihood") if name in e
    )
    if values:
        # Skip the untrained first minibatches (hundreds of nats lower), as bound_figure does.
        low = values[len(values) // 100]
        top.set_ylim(bottom=low - 0.05 * abs(low), top=max(values) + 0.05 * abs(max(values)))
    top.set_ylabel("nats per example")
    bottom.set_ylabel("KL (nats)")
    bottom.set_xlabel("training examples seen")
    top.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def image_shape(input_dim: int) -> tuple[int, int] | None:
    """(rows, columns) of the data sets' images of this size, None for non-image data.

    >>> image_shape(784), image_shape(560), image_shape(17)
    ((28, 28), (28, 20), None)
    """
    return {784: (28, 28), 560: (28, 20)}.get(input_dim)


def manifold_grid(steps: int = 20) -> np.ndarray:
    """[steps * steps, 2] latent points: linearly spaced coordinates on the unit square
    through the inverse Gaussian CDF, as for the paper's Figure 4 (row-major, z2 falling
    down the rows so that the picture's axes point as a plot's would).

    >>> grid = manifold_grid(3)
    >>> grid.shape, bool(abs(grid[4]).max() < 1e-12)
    ((9, 2), True)
    """
    from scipy.stats import norm

    # Cell centres: the corners of the unit square would map to infinite z.
    quantiles = norm.ppf((np.arange(steps) + 0.5) / steps)
    z1, z2 = np.meshgrid(quantiles, quantiles[::-1])
    return np.stack([z1.ravel(), z2.ravel()], axis=1)


def _tile(images: np.ndarray, columns: int, shape: tuple[int, int]) -> np.ndarray:
    rows = int(np.ceil(len(images) / columns))
    height, width = shape
    canvas = np.ones((rows * height, columns * width), dtype=np.float32)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        canvas[r * height : (r + 1) * height, c * width : (c + 1) * width] = image.reshape(shape)
    return canvas


def _image_figure(canvas: np.ndarray, path: pathlib.Path, title: str) -> pathlib.Path:
    height, width = canvas.shape
    figure, axes = plt.subplots(figsize=(7, 7 * height / width + 0.4), dpi=120)
    axes.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def manifold_figure(
    model, path: str | os.PathLike, steps: int = 20, title: str = ""
) -> pathlib.Path:
    """The learned manifold of a 2-D latent image model (the paper's Figure 4)."""
    config = model.config
    shape = image_shape(config.input_dim)
    if config.latent_dim != 2 or shape is None:
        raise ValueError(
            f"the manifold needs a 2-D latent space and image data, got latent_dim "
            f"{config.latent_dim} and input_dim {config.input_dim}"
        )
    means = np.asarray(model.decoder_mean(manifold_grid(steps).astype(np.float32)))
    return _image_figure(
        _tile(means, steps, shape),
        pathlib.Path(path),
        title or "Learned manifold: decoder means over z = inverse CDF of a uniform grid",
    )


def samples_figure(
    model, path: str | os.PathLike, count: int = 100, seed: int = 0, title: str = ""
) -> pathlib.Path:
    """Decoder means of random z ~ N(0, I) (the paper's Figure 5)."""
    config = model.config
    shape = image_shape(config.input_dim)
    if shape is None:
        raise ValueError(f"input_dim {config.input_dim} is not a known image size")
    z = np.random.default_rng(seed).standard_normal((count, config.latent_dim))
    means = np.asarray(model.decoder_mean(z.astype(np.float32)))
    columns = int(np.ceil(np.sqrt(count)))
    return _image_figure(
        _tile(means, columns, shape),
        pathlib.Path(path),
        title or f"Random samples (decoder means), {config.latent_dim}-D latent space",
    )

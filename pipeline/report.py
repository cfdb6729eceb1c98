"""PNG figures of a run, from its `progress.jsonl` and snapshots.

`bound_figure` draws the test-then-train bound and the test-set bound over the examples
seen (log scale, as the paper's Figure 2), optionally with the paper's reported values.

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

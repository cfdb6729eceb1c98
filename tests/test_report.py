"""Tests for pipeline.outputs.figures and `aevb report`: the bound, its terms and drift marks, and
the samples and manifold figures of a 2-D latent image model."""

import io
import pathlib

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy.stats import norm

import vae
from pipeline.cli import main as cli
from pipeline.outputs import figures as report
from pipeline.train.progress import ProgressLog
from pipeline.train.session import Cadence, TrainingSession


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_drift_detections_are_marked_at_their_positions() -> None:
    entries = [
        {"key": "a", "examples": 1000, "elbo": -200.0},
        {"key": "a", "examples": 2500, "drift": {"detector": "page-hinkley"}},
        {"key": "a", "examples": 3000, "elbo": -250.0},
        {"key": "a", "examples": 7000, "drift": {"detector": "page-hinkley"}},
    ]
    figure, axes = plt.subplots()
    report._mark_drift(axes, entries)
    marks = [line.get_xdata()[0] for line in axes.get_lines()]
    plt.close(figure)
    assert marks == [2500, 7000]


def test_manifold_grid_follows_the_inverse_gaussian_cdf() -> None:
    grid = report.manifold_grid(10)
    assert grid.shape == (100, 2)
    z1 = grid[:10, 0]  # the first row, left to right
    np.testing.assert_allclose(z1, norm.ppf((np.arange(10) + 0.5) / 10))
    np.testing.assert_allclose(grid[::10, 1], z1[::-1])  # z2 falls down the rows
    # Equal probability mass per cell: the grid is denser near 0, as in the paper's Fig. 4.
    assert np.diff(z1)[4] < np.diff(z1)[0]


@pytest.fixture(scope="module")
def two_d_run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A short real run of a 784-16-2 model with one drift line, and a real snapshot."""
    run = tmp_path_factory.mktemp("report") / "run"
    config = vae.VAEConfig(input_dim=784, latent_dim=2, hidden_dim=16, batch_size=20, seed=1)
    progress = ProgressLog(run / "progress.jsonl", stream=io.StringIO())
    session = TrainingSession(run, "digits", config, Cadence(log_every_steps=2), progress)
    rng = np.random.default_rng(0)
    for _ in range(10):
        session.train((rng.random((20, 784)) < 0.2).astype(np.float32))
    progress.write({"key": "digits", "examples": 120, "drift": {"detector": "adwin"}})
    session.close()  # the final snapshot
    return run


def test_report_command_writes_every_figure(two_d_run: pathlib.Path, capsys) -> None:
    output = two_d_run / "figures"
    assert cli.main(["report", str(two_d_run), "--output", str(output)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(pathlib.Path(p).name for p in printed)
    assert names == ["bound.png", "manifold-digits.png", "parts.png", "samples-digits.png"]
    for name in names:
        width, height = _png_size(output / name)
        assert width > 300 and height > 300


def test_manifold_tiles_are_decoder_means_on_the_grid(two_d_run: pathlib.Path) -> None:
    model = vae.load_model(two_d_run / "snapshots" / "digits" / "1")
    grid = report.manifold_grid(4)
    means = np.asarray(model.decoder_mean(grid.astype(np.float32)))
    canvas = report._tile(means, 4, (28, 28))
    assert canvas.shape == (4 * 28, 4 * 28)
    np.testing.assert_allclose(canvas[:28, 28:56], means[1].reshape(28, 28))
    np.testing.assert_allclose(canvas[28:56, :28], means[4].reshape(28, 28))


def test_model_figures_refuse_what_they_cannot_draw(tmp_path: pathlib.Path) -> None:
    model = vae.VAE(vae.VAEConfig(input_dim=784, latent_dim=3, hidden_dim=8))
    with pytest.raises(ValueError, match="2-D latent"):
        report.manifold_figure(model, tmp_path / "m.png")
    assert report.samples_figure(model, tmp_path / "s.png", count=9).exists()
    tabular = vae.VAE(vae.VAEConfig(input_dim=17, latent_dim=2, hidden_dim=8))
    with pytest.raises(ValueError, match="image"):
        report.samples_figure(tabular, tmp_path / "t.png")

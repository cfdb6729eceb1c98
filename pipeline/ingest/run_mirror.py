"""A run directory on an object store (``s3://``, ``gs://``, ...): a working copy, published.

On a cluster the workers share no disk, so `--output s3://bucket/run` puts the run directory
on a store every worker reaches. TensorFlow writes SavedModels and NumPy writes checkpoints to
local files, so each process trains into a working copy of its own (a temporary directory)
and `RunMirror` publishes what it writes, object by object, through Beam's `FileSystems` (the
``--s3_*`` flags, or boto3's environment, say where and how). It fetches what another worker
or an earlier job published: a key's newest checkpoint when its session opens.

A store has no atomic rename of a directory, only atomic objects: each object is whole or
absent. So what a reader takes as "complete" is always published last, and withdrawn first:

- a checkpoint: its archive and read ledger, then `state.json`, which names it;
- a snapshot version: every file of the version, `saved_model.pb` last -- a version is
  listed (`published_versions`) only once it has one, the rule TF Serving follows, so a
  poller never loads half a version (tensorflow/serving#1086); pruned, `saved_model.pb` goes
  first;
- JSON lines (progress, dead letters): each process's own file, republished whole at most
  every `LOG_PUBLISH_SECONDS` and when it closes (a store cannot append).

The same layout as on a local disk: `gsutil cp -r` / `aws s3 sync` of the run directory gives
a run directory `aevb` reads. Stores are written through `FileSystems`, so a local path works
too (the example) and the tests run against an S3 server. Which endpoint and credentials:
the job's flags (`--s3_endpoint_url`, ...), which Beam gives every worker's `FileSystems`.

>>> import pathlib, tempfile
>>> store, work = tempfile.mkdtemp(), pathlib.Path(tempfile.mkdtemp())
>>> mirror = RunMirror(store, work)
>>> version = work / "snapshots" / "default" / "1"
>>> (version / "variables").mkdir(parents=True)
>>> for name in ("variables/variables.index", "saved_model.pb"):
...     _ = (version / name).write_text(name)
>>> published_versions(f"{store}/snapshots/default")   # nothing yet
[]
>>> mirror.publish_version(version)
>>> [pathlib.Path(v).name for v in published_versions(f"{store}/snapshots/default")]
['1']
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pathlib
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, S3Options

from vae.snapshot_format import SAVED_MODEL_FILE

__all__ = [
    "RunMirror",
    "configure_stores",
    "fetch_version",
    "is_remote",
    "newest_version",
    "published_objects",
    "published_versions",
    "read_object",
    "store_options",
    "use_store_options",
]

logger = logging.getLogger(__name__)

# Progress and dead-letter files are republished whole; at most this often per file.
LOG_PUBLISH_SECONDS = 30.0


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (a URL with a scheme other than file://)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def store_options(options: PipelineOptions) -> dict[str, Any]:
    """The job's flags for reaching object stores (Beam's `--s3_*` set on the command line),
    for the DoFns that write the run directory to take to their workers: not every runner
    configures a worker's `FileSystems` with the job's flags (FnApiRunner's multi-processing
    workers do not)."""
    flags = options.view_as(S3Options).get_all_options(drop_default=True)
    return {name: value for name, value in flags.items() if name.startswith("s3_")}


def use_store_options(flags: Mapping[str, Any]) -> None:
    """Configures this process's stores with `store_options`' flags; with none, leaves them
    as the runner (or `configure_stores`) configured them. boto3 takes whatever the flags
    leave unsaid (credentials, an `AWS_ENDPOINT_URL`) from its environment and files."""
    if flags:
        FileSystems.set_options(PipelineOptions.from_dictionary(dict(flags)))
        _S3.configure(flags)


def configure_stores(options: PipelineOptions) -> None:
    """A job's own process reaches the stores with the job's flags (before Beam would)."""
    FileSystems.set_options(options)
    _S3.configure(store_options(options))


class _S3:
    """S3 through one boto3 client per process. Beam's S3 file system, the obvious way, took
    10-40x as long per object (0.16-0.2 s a PUT against 0.013, 0.3-0.5 s a GET against
    0.01, moto's server on loopback, 2026-12-07): it opens a client per file and uploads
    each object in three multipart requests. Other stores go through Beam's `FileSystems`."""

    _flags: Mapping[str, Any] = {}
    _client = None
    _lock = threading.Lock()

    @classmethod
    def configure(cls, flags: Mapping[str, Any]) -> None:
        with cls._lock:
            cls._flags, cls._client = dict(flags), None

    @classmethod
    def client(cls):
        with cls._lock:
            if cls._client is None:
                import boto3  # the `s3` extra

                flags = cls._flags
                verify = flags.get("s3_verify")
                cls._client = boto3.client(
                    "s3",
                    endpoint_url=flags.get("s3_endpoint_url"),
                    region_name=flags.get("s3_region_name"),
                    aws_access_key_id=flags.get("s3_access_key_id"),
                    aws_secret_access_key=flags.get("s3_secret_access_key"),
                    aws_session_token=flags.get("s3_session_token"),
                    use_ssl=not flags.get("s3_disable_ssl", False),
                    verify=False if str(verify).lower() == "false" else verify,
                )
            return cls._client

    @staticmethod
    def split(url: str) -> tuple[str, str]:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return bucket, key

    @classmethod
    def get(cls, url: str) -> bytes | None:
        bucket, key = cls.split(url)
        client = cls.client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    @classmethod
    def put(cls, url: str, data: bytes) -> None:
        bucket, key = cls.split(url)
        cls.client().put_object(Bucket=bucket, Key=key, Body=data)

    @classmethod
    def match(cls, pattern: str) -> list[str]:
        bucket, key_pattern = cls.split(pattern)
        prefix = re.split(r"[*?\[]", key_pattern, maxsplit=1)[0]
        matches = re.compile(FileSystem.translate_pattern(pattern)).match
        pages = cls.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = (item["Key"] for page in pages for item in page.get("Contents", []))
        return [url for url in (f"s3://{bucket}/{key}" for key in keys) if matches(url)]

    @classmethod
    def delete(cls, urls: list[str]) -> None:
        for start in range(0, len(urls), 1000):  # S3's most per request
            batch = [cls.split(url) for url in urls[start : start + 1000]]
            objects = {"Objects": [{"Key": key} for _, key in batch], "Quiet": True}
            cls.client().delete_objects(Bucket=batch[0][0], Delete=objects)


def _join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts) if is_remote(url) else os.path.join(url, *parts)


def read_object(url: str) -> bytes | None:
    """The bytes of the object (or file) at `url`; None when there is none."""
    if url.startswith("s3://"):
        return _S3.get(url)
    try:
        with FileSystems.open(url, compression_type="uncompressed") as handle:
            return handle.read()
    except (FileNotFoundError, OSError) as error:
        if _missing(error):
            return None
        raise


def _missing(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, FileNotFoundError) or "Not found" in text or "NoSuchKey" in text


def _write_object(url: str, data: bytes) -> None:
    if url.startswith("s3://"):
        _S3.put(url, data)
        return
    with FileSystems.create(url, mime_type="application/octet-stream") as handle:
        handle.write(data)


def _delete(urls: list[str]) -> None:
    """Deletes the objects (or files); absent ones are skipped."""
    if urls and urls[0].startswith("s3://"):
        _S3.delete(urls)
        return
    for url in urls:
        try:
            FileSystems.delete([url])
        except Exception as error:  # Beam wraps a missing file in BeamIOError
            if not _missing(error) and "not found" not in str(error).lower():
                raise


def published_objects(pattern: str) -> list[str]:
    """The objects (or files) matching `pattern`, sorted: `*` within one path segment,
    `**` across them."""
    if pattern.startswith("s3://"):
        return sorted(_S3.match(pattern))
    (result,) = FileSystems.match([pattern])
    return sorted(metadata.path for metadata in result.metadata_list)


def published_versions(model_url: str) -> list[str]:
    """The URLs of the complete snapshot versions of a model directory on a store (or a
    local path), oldest first: the integer directories that have a `saved_model.pb`."""
    versions = []
    for path in published_objects(_join(model_url, "*", SAVED_MODEL_FILE)):
        version = posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)
        if os.path.basename(version).isdigit():
            versions.append(version)
    return sorted(versions, key=lambda version: int(os.path.basename(version)))


def newest_version(model_url: str) -> str | None:
    """`model_url` itself when it is a published version (it has a `saved_model.pb`), else
    the newest published version of that model directory; None when it has none."""
    if published_objects(_join(model_url, SAVED_MODEL_FILE)):
        return model_url.rstrip("/")
    versions = published_versions(model_url)
    return versions[-1] if versions else None


def fetch_version(version_url: str, cache: str | os.PathLike) -> pathlib.Path:
    """A local copy of the published snapshot version at `version_url`, under
    `cache/<model>/<version>/` (fetched once; a version never changes once published).

    Raises FileNotFoundError when the version was pruned meanwhile (a poller lists, then
    fetches, and may lose that race: it keeps the model it has)."""
    model = os.path.basename(os.path.dirname(version_url.rstrip("/")))
    version = os.path.basename(version_url.rstrip("/"))
    target = pathlib.Path(cache) / model / version
    if (target / SAVED_MODEL_FILE).exists():
        return target
    pathlib.Path(cache).mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{model}-{version}-", dir=cache))
    try:
        prefix = version_url.rstrip("/") + "/"
        for url in published_objects(prefix + "**"):
            data = read_object(url)
            if data is None:
                raise FileNotFoundError(f"{url} vanished while it was fetched (pruned?)")
            local = staging / url[len(prefix) :]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
        if not (staging / SAVED_MODEL_FILE).exists():
            raise FileNotFoundError(f"{version_url} is not a complete snapshot version")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, target)
        except OSError:  # another thread of this process fetched it first
            if not (target / SAVED_MODEL_FILE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class RunMirror:
    """Publishes a working copy of a run directory to the store at `url`, and fetches from it.

    Every method takes paths inside the working copy `local`; the object's name is the
    path relative to it under `url`.
    """

    def __init__(self, url: str, local: str | os.PathLike) -> None:
        self.url = url.rstrip("/")
        self.local = pathlib.Path(local)
        self._log_published: dict[pathlib.Path, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, url: str) -> RunMirror:
        """This process's mirror of `url`, its working copy a temporary directory removed
        when the process exits."""
        with _mirrors_lock:
            mirror = _mirrors.get(url)
            if mirror is None:
                local = tempfile.mkdtemp(prefix="aevb-run-")
                atexit.register(shutil.rmtree, local, ignore_errors=True)
                mirror = _mirrors[url] = cls(url, local)
                logger.info("run directory %s: working copy %s", url, local)
            return mirror

    def url_of(self, path: str | os.PathLike) -> str:
        relative = pathlib.Path(path).relative_to(self.local)
        return _join(self.url, *relative.parts)

    # Files

    def publish(self, paths: Iterable[str | os.PathLike]) -> None:
        """Uploads each file, in order (the one that makes the rest count goes last)."""
        for path in paths:
            _write_object(self.url_of(path), pathlib.Path(path).read_bytes())

    def withdraw(self, paths: Iterable[str | os.PathLike]) -> None:
        """Deletes the objects of these paths, in order; absent ones are skipped."""
        for path in paths:
            _delete([self.url_of(path)])

    def published(self, pattern: str | os.PathLike) -> list[pathlib.Path]:
        """The working-copy paths of the published objects matching the glob `pattern` (a
        path in the working copy), whether or not this process has them."""
        prefix = self.url + "/"
        return [self.local / url[len(prefix) :] for url in published_objects(self.url_of(pattern))]

    def read_json(self, path: str | os.PathLike) -> Any:
        """The published JSON document of `path`; None when there is none."""
        data = read_object(self.url_of(path))
        return None if data is None else json.loads(data)

    def fetch(self, paths: Iterable[str | os.PathLike]) -> bool:
        """Downloads the published objects of these paths over the working copy; False (and
        nothing written) when one is missing."""
        contents = []
        for path in paths:
            data = read_object(self.url_of(path))
            if data is None:
                return False
            contents.append((pathlib.Path(path), data))
        for path, data in contents:
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(path.name + ".tmp")
            staged.write_bytes(data)
            os.replace(staged, path)
        return True

    def publish_log(self, path: str | os.PathLike, force: bool = False) -> bool:
        """Republishes an append-only file if `LOG_PUBLISH_SECONDS` have passed since it
        was last (or `force`): a store cannot append, so the object is the whole file.
        Returns whether it did."""
        path = pathlib.Path(path)
        now = time.monotonic()
        with self._lock:
            last = self._log_published.get(path)
            if not path.exists() or (
                not force and last is not None and now - last < LOG_PUBLISH_SECONDS
            ):
                return False
            self._log_published[path] = now
        self.publish([path])
        return True

    # Snapshot versions

    def publish_version(self, version_dir: str | os.PathLike) -> None:
        """Uploads a snapshot version with `saved_model.pb` last: until then no reader lists
        it."""
        version_dir = pathlib.Path(version_dir)
        files = sorted(p for p in version_dir.rglob("*") if p.is_file())
        graph = version_dir / SAVED_MODEL_FILE
        self.publish([*(p for p in files if p != graph), graph])

    def withdraw_version(self, version_url: str) -> None:
        """Deletes a published version, `saved_model.pb` first: readers stop listing it
        before any of its other files goes."""
        graph = _join(version_url, SAVED_MODEL_FILE)
        _delete([graph])
        rest = published_objects(version_url.rstrip("/") + "/**")
        if rest:
            _delete(rest)

    def remove_unpublished_versions(self) -> list[str]:
        """Deletes the files of versions a writer killed mid-upload left without their
        `saved_model.pb` (no reader ever listed them). Only for the job that holds the run,
        before it trains. Returns the version URLs removed."""
        snapshots = _join(self.url, "snapshots") + "/"
        published = {
            posixpath.dirname(p) for p in published_objects(snapshots + "*/*/" + SAVED_MODEL_FILE)
        }
        partial = set()
        for path in published_objects(snapshots + "*/*/**"):
            version = path[len(snapshots) :].split("/")[:2]
            url = snapshots + "/".join(version)
            if version[1].isdigit() and url not in published:
                partial.add(url)
        for url in sorted(partial):
            _delete(published_objects(url + "/**"))
        return sorted(partial)


def worker_name() -> str:
    """`<host>-<pid>`: what tells one worker process's files from another's."""
    return f"{socket.gethostname()}-{os.getpid()}"


_mirrors: dict[str, RunMirror] = {}
_mirrors_lock = threading.Lock()

"""Versioned SavedModel snapshots under `RUN_DIR/snapshots/<model>/<version>/`.

The model directory is a valid TF Serving `model_base_path` at every instant: it holds only
integer version directories, each a complete SavedModel. A snapshot is written to a staging
directory beside it (same file system, outside the model directory) and renamed into place,
so a reader polling the directory -- TF Serving, Beam's WatchFilePattern -- never sees a
partial model. Versions strictly increase and are never reused, even across restarts and
after old versions were pruned. Each snapshot carries `assets.extra/aevb.json` and TF
Serving's warm-up requests, `assets.extra/tf_serving_warmup_requests`: the format is
`vae.snapshot_format`'s, this module only decides when and where versions appear. A run
directory on an object store has no atomic rename: there a version is published file by
file with `saved_model.pb` last (`pipeline.ingest.run_mirror`).

>>> import tempfile, vae
>>> writer = SnapshotWriter(tempfile.mkdtemp(), "default", keep=2)
>>> model = vae.VAE(vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8))
>>> [writer.write(model, {"examples_seen": n}).name for n in (10, 20, 30)]
['1', '2', '3']
>>> sorted(p.name for p in writer.model_dir.iterdir())    # only the newest two are kept
['2', '3']
"""

from __future__ import annotations

import json
import os
import pathlib
import posixpath
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from pipeline.ingest.run_mirror import (
    RunMirror,
    is_remote,
    published_versions,
    read_object,
)
from vae.snapshot_format import (
    GRAPH_FILE_PREFIX,
    METADATA_PATH,
    read_metadata,
    version_directories,
)

if TYPE_CHECKING:  # TensorFlow: imported by `write` only, so reading the layout stays light
    import vae

__all__ = ["SnapshotWriter", "newest_snapshot_metadata", "remove_staging"]

STAGING_DIR = ".staging"
# `<model>.last_version` in the staging directory: the highest version ever written.
HIGH_WATER_MARK_SUFFIX = ".last_version"


def remove_staging(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Removes what writers killed mid-snapshot or mid-prune left in `snapshots/.staging/`,
    and graph files no version links to any more, keeping each model's record of the
    versions it used. Only for the job that holds the run directory, before it trains.
    Returns what was removed."""
    removed = []
    for entry in sorted(pathlib.Path(run_dir, "snapshots", STAGING_DIR).glob("*")):
        if entry.name.endswith(HIGH_WATER_MARK_SUFFIX) or _linked_graph(entry):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def _linked_graph(path: pathlib.Path) -> bool:
    """A configuration's graph file that some version's `saved_model.pb` is a link to.

    Each process traces its own graph (the bytes differ between processes in the names
    TensorFlow gives functions), so every run of a job adds one; it goes once the versions
    linking to it are pruned."""
    graph = path.name.startswith(GRAPH_FILE_PREFIX) and path.suffix == ".pb"
    return graph and path.stat().st_nlink > 1


def newest_snapshot_metadata(run_dir: str | os.PathLike, model_name: str) -> dict[str, Any]:
    """The metadata (`assets.extra/aevb.json`) of the newest version of a model under
    `run_dir` (local, or published on a store); {} when it has none."""
    model_dir = os.path.join(os.fspath(run_dir), "snapshots", model_name)
    if not is_remote(run_dir):
        versions = version_directories(model_dir)
        return read_metadata(versions[-1]) if versions else {}
    versions = published_versions(model_dir)
    data = read_object(f"{versions[-1]}/{METADATA_PATH.as_posix()}") if versions else None
    return {} if data is None else json.loads(data)


class SnapshotWriter:
    """Exports a model as the next version of `RUN_DIR/snapshots/<model_name>/`.

    With a `mirror`, `run_dir` is its working copy: each version is published to the store
    once written (`saved_model.pb` last), numbered above every version published before,
    and pruned there too (`saved_model.pb` first)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        model_name: str,
        keep: int = 5,
        mirror: RunMirror | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        snapshots = pathlib.Path(run_dir) / "snapshots"
        self.model_name = model_name
        self.model_dir = snapshots / model_name
        self.keep = keep
        self.mirror = mirror
        # Staging lives beside the model directories (same file system, so the rename is
        # atomic) under a name TF Serving would never take for a model.
        self._staging = snapshots / STAGING_DIR
        self._high_water_mark = self._staging / f"{model_name}{HIGH_WATER_MARK_SUFFIX}"

    def latest_version(self) -> int | None:
        versions = [path.name for path in version_directories(self.model_dir)]
        if self.mirror is not None:
            published = published_versions(self.mirror.url_of(self.model_dir))
            versions += [posixpath.basename(url) for url in published]
        return max(map(int, versions), default=None)

    def newest_metadata(self) -> dict[str, Any]:
        """The newest version's metadata ({} when there is none)."""
        if self.mirror is None:
            return newest_snapshot_metadata(self.model_dir.parent.parent, self.model_name)
        return newest_snapshot_metadata(self.mirror.url, self.model_name)

    def write(self, model: vae.VAE, metadata: dict[str, Any]) -> pathlib.Path:
        """Exports `model` with `metadata` as a new version; returns its directory."""
        import vae
        from vae.snapshot_format import write_metadata, write_warmup_requests

        self.model_dir.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        version = self._next_version()
        staging = pathlib.Path(
            tempfile.mkdtemp(prefix=f"{self.model_name}-{version}-", dir=self._staging)
        )
        try:
            # The graph of the versions links to one file per configuration in the staging
            # directory: 10,000 keys would otherwise hold 10,000 copies of it.
            vae.save(model, staging, graph_dir=self._staging)
            write_metadata(staging, self.model_name, version, model.config, metadata)
            write_warmup_requests(
                staging, model.config.input_dim, model.config.latent_dim, self.model_name
            )
            target = self.model_dir / str(version)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # Replaced whole, never half-written: an empty record would stop every snapshot.
        staged = self._high_water_mark.with_name(self._high_water_mark.name + ".tmp")
        staged.write_text(str(version))
        os.replace(staged, self._high_water_mark)
        if self.mirror is not None:
            self.mirror.publish_version(target)
            self.mirror.publish([self._high_water_mark])
        self._prune()
        return target

    def _next_version(self) -> int:
        try:
            recorded = int(self._high_water_mark.read_text())
        except (FileNotFoundError, ValueError):  # none yet, or one left by an older writer
            recorded = 0
        if self.mirror is not None:  # what every worker before this one published
            recorded = max(recorded, int(self.mirror.read_json(self._high_water_mark) or 0))
        return max(recorded, self.latest_version() or 0) + 1

    def _prune(self) -> None:
        for old in version_directories(self.model_dir)[: -self.keep]:
            # Renamed out first, so a reader sees the version vanish at once, never half-deleted.
            doomed = pathlib.Path(tempfile.mkdtemp(prefix="pruned-", dir=self._staging)) / old.name
            os.rename(old, doomed)
            shutil.rmtree(doomed.parent, ignore_errors=True)
        if self.mirror is not None:
            for url in published_versions(self.mirror.url_of(self.model_dir))[: -self.keep]:
                self.mirror.withdraw_version(url)

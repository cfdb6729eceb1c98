"""The layout of a served model: a model directory of integer version directories.

A model directory (a TF Serving `model_base_path`, e.g. `RUN_DIR/snapshots/default/`) holds
one SavedModel per integer-named subdirectory; the highest number is the newest. Nothing here
imports TensorFlow, so paths can be checked before the slow import.

>>> import pathlib, tempfile
>>> model_dir = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("9", "10", "tmp"):
...     (model_dir / name).mkdir()
...     (model_dir / name / "saved_model.pb").touch()
>>> [p.name for p in version_directories(model_dir)]       # by number, not by name
['9', '10']
>>> resolve_version(model_dir).name, resolve_version(model_dir / "9").name
('10', '9')
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["resolve_version", "version_directories", "version_number"]

SAVED_MODEL_FILE = "saved_model.pb"


def version_directories(model_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The integer version directories of a model directory, oldest first ([] if none)."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        return []
    versions = [p for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(versions, key=lambda p: int(p.name))


def resolve_version(path: str | os.PathLike) -> pathlib.Path:
    """A SavedModel directory as given, or the newest version of a model directory.

    Raises:
        FileNotFoundError: `path` is neither (the message names it).
    """
    path = pathlib.Path(path)
    if (path / SAVED_MODEL_FILE).exists():
        return path
    versions = version_directories(path)
    if not versions:
        raise FileNotFoundError(
            f"{path} is neither a SavedModel directory nor a model directory with "
            "integer version subdirectories"
        )
    return versions[-1]


def version_number(version_dir: str | os.PathLike) -> int | None:
    """The version a SavedModel directory's name says (None for a non-integer name)."""
    name = pathlib.Path(version_dir).name
    return int(name) if name.isdigit() else None

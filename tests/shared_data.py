"""Where the tests find the real data sets: $AEVB_DATA_DIR (CI sets it relative to the
checkout), else ../shared/data beside the checkout; tests that need them skip otherwise."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
    env = os.environ.get("AEVB_DATA_DIR")
    if env:
        return pathlib.Path(env).resolve()
    candidate = REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


SHARED = shared_data_dir()
needs_data = pytest.mark.skipif(
    SHARED is None,
    reason="real data not found: AEVB_DATA_DIR is unset and ../shared/data is absent",
)

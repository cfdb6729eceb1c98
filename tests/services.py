"""The local services of `benchmarks.services` for tests: a test that needs one that is not
built fails in CI (`make test` builds them) and is skipped elsewhere.

>>> needed(lambda: 42)
42
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest

from benchmarks.services import ServiceUnavailable

T = TypeVar("T")


def needed(find: Callable[[], T]) -> T:
    """`find()`, or the test fails (CI) or skips (elsewhere) saying what is missing."""
    try:
        return find()
    except ServiceUnavailable as missing:
        if os.environ.get("CI"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))

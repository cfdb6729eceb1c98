"""A command's result on stdout: one JSON object, or one aligned ``name value`` line per field.

>>> print_result({"elbo": -99.5, "examples": 10}, as_json=True)
{"elbo": -99.5, "examples": 10}
>>> print_result({"elbo": -99.5}, as_json=False)
elbo                             -99.5
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["print_result"]


def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    for name, value in result.items():
        print(f"{name:32s} {value}")

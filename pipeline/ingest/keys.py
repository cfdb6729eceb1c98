"""Model keys: every record trains the model of its key, which names directories and labels.

A key becomes a directory name (`RUN_DIR/checkpoints/<key>/`, `snapshots/<key>/`) and a
Prometheus label value, so only tame ones are accepted; decoding sends a record with any
other key to the dead-letter output.

>>> validate_model_key("sensor-7")
'sensor-7'
>>> validate_model_key("../etc")
Traceback (most recent call last):
...
ValueError: model key '../etc' must start with a letter or digit and contain only letters, \
digits, '_', '.' and '-' (at most 128 characters)
"""

from __future__ import annotations

import re

__all__ = ["MODEL_KEY_RULE", "is_model_key", "validate_model_key"]

# Matched whole (`fullmatch`): with `match` and "$", a trailing newline would pass.
_MODEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_KEY_RULE = (
    "must start with a letter or digit and contain only letters, digits, '_', '.' and '-' "
    "(at most 128 characters)"
)


def is_model_key(key: object) -> bool:
    """Whether `key` can name a model: a string the pattern matches whole.

    >>> is_model_key("sensor-7"), is_model_key("sensor-7\\n"), is_model_key("a\\x00b")
    (True, False, False)
    """
    return isinstance(key, str) and _MODEL_KEY.fullmatch(key) is not None


def validate_model_key(key: str) -> str:
    """Returns `key` if it can name a model, else raises ValueError saying why."""
    if not is_model_key(key):
        raise ValueError(f"model key {key!r} {MODEL_KEY_RULE}")
    return key

"""Row validation: which rows of a numeric block the VAE may train on, and why not the rest.

One vectorised pass per block (no Python loop over values): a row is rejected for the first
of these that applies -- ``wrong_width`` (the block is not ``input_dim`` wide: every row),
``non_finite`` (NaN or +-inf anywhere in the row, also a value too large for float32),
``out_of_support`` (a Bernoulli decoder needs every value in [0, 1]; a Gaussian one takes
any finite value).

>>> import numpy as np
>>> rows = np.array([[0.0, 1.0], [np.nan, 0.5], [0.2, 3.0]])
>>> good, rejected = validate_rows(rows, input_dim=2, likelihood="bernoulli")
>>> good.tolist(), [(i, reason) for i, reason, _ in rejected]
([[0.0, 1.0]], [(1, 'non_finite'), (2, 'out_of_support')])
>>> validate_rows(rows[2:], 2, "gaussian")[0].tolist()
[[0.20000000298023224, 3.0]]
"""

from __future__ import annotations

import numpy as np

from vae.config import check_likelihood

__all__ = ["validate_rows", "wrong_width_detail"]


def wrong_width_detail(width: int, input_dim: int) -> str:
    return f"row has {width} values, expected {input_dim}"


def validate_rows(
    values: np.ndarray, input_dim: int, likelihood: str
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Split a 2-D numeric block into valid float32 rows and rejections.

    Returns:
        (good rows as float32 [k, input_dim], C-contiguous, in their original order;
        ``[(row_index, reason, detail), ...]`` for the rejected rows, by row index).

    Raises:
        ValueError: ``values`` is not 2-D, or ``likelihood`` is unknown.
        TypeError: ``values`` is not a bool, integer or floating-point array.
    """
    check_likelihood(likelihood)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D, got shape {values.shape}")
    if values.dtype.kind not in "biuf":
        raise TypeError(f"values must be numeric, got dtype {values.dtype}")
    n_rows, width = values.shape
    if width != input_dim:
        detail = wrong_width_detail(width, input_dim)
        return _empty(input_dim), [(i, "wrong_width", detail) for i in range(n_rows)]

    # Checked after the cast: a float64 value beyond float32's range becomes inf there,
    # and inf is what the trainer would see.
    with np.errstate(over="ignore"):
        rows = np.asarray(values, dtype=np.float32)
    bad_value = ~np.isfinite(rows)
    # NaN compares False both ways, so only numbers (inf too) can be outside [0, 1].
    bernoulli = likelihood == "bernoulli"
    outside = (rows < 0) | (rows > 1) if bernoulli else np.zeros_like(bad_value)
    non_finite = bad_value.any(axis=1)
    out_of_support = outside.any(axis=1) & ~non_finite
    ok = ~(non_finite | out_of_support)
    if ok.all():
        return np.ascontiguousarray(rows), []

    # Only the (rare) rejected rows are visited one by one, to say which value was bad.
    rejected: list[tuple[int, str, str]] = []
    for index in np.flatnonzero(~ok).tolist():
        if non_finite[index]:
            column = int(np.argmax(bad_value[index]))
            original = values[index, column]
            detail = f"column {column} is {original}"
            if np.isfinite(original):
                detail += ", too large for float32"
            rejected.append((index, "non_finite", detail))
        else:
            column = int(np.argmax(outside[index]))
            rejected.append(
                (
                    index,
                    "out_of_support",
                    f"column {column} is {values[index, column]}, outside [0, 1] "
                    "as the bernoulli likelihood requires",
                )
            )
    return np.ascontiguousarray(rows[ok]), rejected


def _empty(input_dim: int) -> np.ndarray:
    return np.empty((0, input_dim), dtype=np.float32)

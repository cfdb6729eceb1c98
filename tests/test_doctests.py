"""Runs the docstring examples of every module of the vae package."""

import doctest
import importlib
import pkgutil

import pytest

import vae

SUBMODULES = sorted(
    f"vae.{info.name}" for info in pkgutil.iter_modules(vae.__path__) if not info.ispkg
)
MODULES = ["vae", *SUBMODULES]
# Modules whose docstrings are known to carry examples: an empty run there means the
# examples vanished (or doctest stopped finding them), which should fail loudly.
WITH_EXAMPLES = {"vae", "vae.config", "vae.model", "vae.optimizers", "vae.train", "vae.evaluation"}


def test_every_module_is_listed() -> None:
    assert set(MODULES) >= WITH_EXAMPLES | {"vae.export"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"no examples found in {name}"

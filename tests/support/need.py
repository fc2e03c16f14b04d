"""What a test needs from the machine: skip with what to install, but never under CI=true.

A missing tool or package skips the test on a developer's machine with the command that
installs it; under CI=true (set by .ci/run, which installs everything listed there and the
``test`` extra) the same absence fails the test, so CI never passes by skipping.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def missing(what: str) -> None:
    """Skip (fail under CI=true) because ``what`` is missing; ``what`` says how to install it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: this test must run, not skip)", pytrace=False)
    pytest.skip(what)


def need_module(name: str, install: str) -> ModuleType:
    """Import ``name``, or :func:`missing` with the ``install`` command (usable at module level)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} not installed: {install} (CI=true: these tests must run)", pytrace=False)
        pytest.skip(f"{name} not installed: {install}", allow_module_level=True)

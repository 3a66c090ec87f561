"""Shared fixtures: every test ends with no actor left running."""

from __future__ import annotations

import faulthandler

import pykka
import pytest

faulthandler.enable()


@pytest.fixture(autouse=True)
def _stop_all_actors():
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)

"""Fixtures of the hostile suite: tiny base models and the fork server that isolates cases."""

from __future__ import annotations

import pytest

from .files import base_models
from .isolation import ForkServer
from .probes import warm_up


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict:
    return base_models(tmp_path_factory.mktemp("hostile-bases"))


@pytest.fixture(scope="session")
def isolated(bases):
    """isolated(probe, *args) -> Outcome of probe(*args) in its own limited process."""
    server = ForkServer(warm_up, bases)
    yield server.run
    server.close()

"""Fixtures of the hostile suite: tiny base models and the fork server that isolates cases."""

from __future__ import annotations

import sys

import pytest

from .files import base_models
from .isolation import ForkServer
from .probes import warm_up


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict:
    return base_models(tmp_path_factory.mktemp("hostile-bases"))


@pytest.fixture(scope="session")
def isolated(request):
    """isolated(probe, *args) -> Outcome of probe(*args) in its own limited process."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the isolation forks and limits RLIMIT_AS, as Linux does")
    server = ForkServer(warm_up, request.getfixturevalue("bases"))
    yield server.run
    server.close()

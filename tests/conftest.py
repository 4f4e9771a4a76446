"""Shared fixtures: every test gets a fresh master and kills what it started."""

from __future__ import annotations

import pytest

from harness import Cluster


@pytest.fixture
def cluster():
    clusters: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        c = Cluster(**kwargs)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.close()

"""The chart tests need helm and kubeconform with their offline schemas, which
scripts/install.sh (section 4) builds into <run dir>/chart-tools. Without them each test is
skipped with the reason; under CI=true that skip fails the run (tests/conftest.py)."""

from __future__ import annotations

import pytest

from .support import Tools


@pytest.fixture(scope="session")
def tools() -> Tools:
    found = Tools.find()
    if found is None:
        pytest.skip(
            "helm and kubeconform are not installed; run scripts/install.sh (needs Go >= 1.26)"
        )
    return found

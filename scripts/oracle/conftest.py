import os
import shutil

import pytest

from espd_oracle import ESPD

IN_CI = os.environ.get("CI") == "true"


def pytest_sessionstart(session):
    if not ESPD.exists():
        raise pytest.UsageError(f"{ESPD} is missing: run `cargo build --release` first")


@pytest.fixture
def tshark():
    path = shutil.which("tshark")
    if path is None:
        if IN_CI:
            pytest.fail("tshark is required in CI (scripts/deps.sh installs it)")
        pytest.skip("tshark not installed (scripts/deps.sh installs it)")
    return path

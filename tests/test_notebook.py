"""notebooks/quickstart.ipynb executed headless in a real kernel (embedded default), as the
README's first command does; asserts on the saved outputs and widget states (tests/quickstart.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import docker
import pytest

from tests import quickstart as checks
from tests.conftest import IMAGE, NUMPY_IMAGE, ROOT


@pytest.fixture(scope="module")
def quickstart(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CELERY_NB_BROKER_URL"}  # the embedded default
    env.update(QUICKSTART_IMAGE=IMAGE, QUICKSTART_NUMPY_IMAGE=NUMPY_IMAGE, QUICKSTART_FUNCTION_IMAGE=IMAGE)
    output: Path = tmp_path_factory.mktemp("quickstart") / "quickstart.ipynb"
    return checks.execute([sys.executable], str(ROOT / "notebooks/quickstart.ipynb"), str(output), env=env)


def test_values_come_back_to_the_kernel(quickstart: dict) -> None:
    checks.assert_values_come_back(quickstart)


def test_failures_are_clear_and_leave_the_namespace_alone(quickstart: dict) -> None:
    checks.assert_failures_are_clear(quickstart)


def test_saved_outputs_are_readable_without_widgets(quickstart: dict) -> None:
    checks.assert_outputs_readable_without_widgets(quickstart)


def test_widget_states_are_saved(quickstart: dict) -> None:
    checks.assert_widget_states_saved(quickstart)

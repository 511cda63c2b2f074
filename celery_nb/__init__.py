"""celery_nb: run notebook cells and functions in Docker containers through Celery.

In a notebook::

    %load_ext celery_nb

    %%celery_docker --image python:3.12-slim --memory 2g
    result = heavy(x)          # x comes from the kernel, result goes back to it

From Python: ``submit(fn, *args, image=...)``, ``@remote(image=...)``, ``Executor(...)``
(``concurrent.futures``) and joblib's backend ``"celery_nb"`` (scikit-learn's ``n_jobs``).
"""
from __future__ import annotations

import importlib.util
from typing import Any

from celery_nb import widgets  # noqa: F401  (shows Jobs as live widgets in notebooks)
from celery_nb import journal
from celery_nb.client import Client, RemoteFunction, default_client, remote, submit
from celery_nb.config import CeleryNB, use_settings
from celery_nb.errors import (BrokerUnavailableError, CeleryNBError, ContainerError, DockerUnavailableError,
                              EnvironmentBuildError, ImageNotFoundError, InputError, JobCancelled, JobTimeoutError,
                              LogUnavailableError, NoWorkerError, OptionError, OutOfMemoryError, OutputError,
                              PolicyError, PythonVersionError, RemoteError, SignatureError, UnknownJobError,
                              UnsupportedMagicError)
from celery_nb.executor import Executor
from celery_nb.job import Job, JobFuture
from celery_nb.options import JobOptions
from celery_nb_runtime import progress

if importlib.util.find_spec("joblib") is not None:  # joblib is optional: its backend "celery_nb" if it is there
    from celery_nb import joblib_backend

    joblib_backend.register()

__all__ = [
    "BrokerUnavailableError", "CeleryNBError", "Client", "ContainerError", "DockerUnavailableError",
    "EnvironmentBuildError", "Executor", "ImageNotFoundError", "InputError", "Job", "JobCancelled", "JobFuture",
    "JobOptions", "JobTimeoutError", "LogUnavailableError", "NoWorkerError", "OptionError", "OutOfMemoryError",
    "OutputError", "PolicyError", "PythonVersionError", "RemoteError", "RemoteFunction", "SignatureError",
    "UnknownJobError", "UnsupportedMagicError", "default_client", "progress", "remote", "submit",
]


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext celery_nb``: settings (``%config CeleryNB``), magics, and the embedded worker."""
    from celery_nb.magics import CeleryDockerMagics

    config = CeleryNB(parent=shell)
    shell.configurables.append(config)
    use_settings(config)
    shell.register_magics(CeleryDockerMagics)
    # a cell's jobs are in the journal before the cell ends: a kernel restarted right after a
    # `--no-wait` cell finds them (the background writer may not have run yet)
    shell.events.register("post_run_cell", lambda _result: journal.write_pending())
    if config.broker_url is None:
        default_client()  # start the embedded worker now rather than in the first cell

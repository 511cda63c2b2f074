"""Errors the user sees. Each says what went wrong and what to do about it."""
from __future__ import annotations

from typing import Any

from celery_nb.distributions import version_table


class CeleryNBError(Exception):
    """Base class of every celery_nb error."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows the error alone: its message says what happened and what to do, while the
        kernel-side stack (celery_nb's own frames) says nothing useful."""
        return f"{type(self).__name__}: {self}".split("\n")


class OptionError(CeleryNBError, ValueError):
    """A job option is malformed (``--memory lots``); nothing was submitted."""


class InputError(CeleryNBError):
    """An input could not be shipped (unpicklable, missing from the kernel); nothing was submitted."""


class OutputError(CeleryNBError):
    """An output was not assigned, cannot be pickled, or cannot be loaded in the kernel."""


class BrokerUnavailableError(CeleryNBError):
    """The kernel cannot reach the Celery broker; nothing was submitted."""


class UnknownJobError(CeleryNBError, KeyError):
    """No job with that id is known to the job store (wrong broker, or its events expired)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class SignatureError(CeleryNBError):
    """A request or result is unsigned or altered (CELERY_NB_SECRET); nothing was run or unpickled."""


class PolicyError(CeleryNBError):
    """The worker's policy refused the request (image, limits)."""


class ContainerError(CeleryNBError):
    """The container could not be created or ended without a result."""


class ImageNotFoundError(ContainerError):
    """The requested image is not on the worker host and could not be pulled."""


class EnvironmentBuildError(ContainerError):
    """The job's environment (--pip, --requirements) could not be built: an unknown package, an
    impossible pin, a conflict, or no reachable index; the installer's own lines say which."""


class DockerUnavailableError(ContainerError):
    """The worker cannot reach its Docker daemon."""


class JobTimeoutError(ContainerError, TimeoutError):
    """The job ran longer than its --timeout; the container was killed."""


class OutOfMemoryError(ContainerError, MemoryError):
    """The container was killed for exceeding its --memory limit."""


class PythonVersionError(CeleryNBError):
    """A cloudpickled function needs the same Python minor version in kernel and image."""


class JobCancelled(CeleryNBError):
    """The job was cancelled before it finished; the kernel namespace is unchanged."""


class RemoteError(CeleryNBError):
    """The code raised an exception inside the container.

    ``exc_type`` is the remote exception's class name and ``remote_traceback`` the
    container-side traceback, whose cell frames carry the notebook cell's line numbers.
    """

    def __init__(self, message: str, exc_type: str | None, remote_traceback: str, job_id: str, image: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.job_id = job_id
        self.image = image

    def __str__(self) -> str:
        return (f"{self.args[0]}\n\nin job {self.job_id} (image {self.image}); remote traceback:\n"
                f"{self.remote_traceback}")

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of the kernel-side stack, which says nothing useful."""
        return [f"RemoteError: the cell failed in its container (job {self.job_id}, image {self.image})",
                *self.remote_traceback.rstrip("\n").split("\n")]


# error "kind" as sent by the worker/runtime -> the class raised in the kernel
_KINDS: dict[str, type[CeleryNBError]] = {
    "input": InputError,
    "output": OutputError,
    "policy": PolicyError,
    "container": ContainerError,
    "image_not_found": ImageNotFoundError,
    "docker_unavailable": DockerUnavailableError,
    "environment": EnvironmentBuildError,
    "timeout": JobTimeoutError,
    "oom": OutOfMemoryError,
    "version": PythonVersionError,
    "signature": SignatureError,
}


def error_from_event(error: dict[str, Any], job_id: str, image: str) -> CeleryNBError:
    """Rebuild the exception described by a job's final event."""
    if error["kind"] == "remote":
        return RemoteError(error["message"], error.get("exc_type"), error.get("traceback") or "", job_id, image)
    message = error["message"]
    if error.get("packages") or error.get("python"):  # a value or function the environment could not load
        message = f"{message}\n{version_table(error.get('packages') or {}, error.get('python'))}"
    return _KINDS.get(error["kind"], ContainerError)(message)


def error_kind(exc: CeleryNBError) -> str:
    """The "kind" under which the worker reports ``exc`` (inverse of error_from_event)."""
    return next((kind for kind, cls in _KINDS.items() if type(exc) is cls), "container")

"""Errors the user sees. Each says what went wrong and what to do about it."""
from __future__ import annotations

import re
import sys
from typing import Any

from celery_nb.distributions import installable, version_table


class CeleryNBError(Exception):
    """Base class of every celery_nb error."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows the error alone: its message says what happened and what to do, while the
        kernel-side stack (celery_nb's own frames) says nothing useful."""
        return f"{type(self).__name__}: {self}".split("\n")


class OptionError(CeleryNBError, ValueError):
    """A job option is malformed (``--memory lots``); nothing was submitted."""


class UnsupportedMagicError(CeleryNBError):
    """A cell uses an IPython magic that would run in the container, where IPython is not loaded;
    nothing was submitted."""


class InputError(CeleryNBError):
    """An input could not be shipped (unpicklable, missing from the kernel); nothing was submitted."""


class OutputError(CeleryNBError):
    """An output was not assigned, cannot be pickled, or cannot be loaded in the kernel."""


class BrokerUnavailableError(CeleryNBError):
    """The kernel cannot reach the Celery broker; nothing was submitted."""


class NoWorkerError(CeleryNBError, RuntimeError):
    """No worker answered that it takes jobs from the queue (joblib's n_jobs=-1 counts their slots)."""


class UnknownJobError(CeleryNBError, KeyError):
    """No job with that id is known to the job store (wrong broker, or its events expired)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class SignatureError(CeleryNBError):
    """A request or result is unsigned or altered (CELERY_NB_SECRET); nothing was run or unpickled."""


class LogUnavailableError(CeleryNBError, LookupError):
    """The whole log of a job (``Job.full_log()``) was not kept, or has expired."""


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
    container-side traceback, whose cell frames carry the notebook cell's line numbers. When the
    kernel has the remote exception's class, the error is also an instance of it (a subclass of
    both, made once per class), so ``except ValueError:`` catches it.
    ``what`` failed: "the cell", or the function's label.
    """

    def __new__(cls, message: str, *_args: Any, **_kwargs: Any) -> RemoteError:
        # the remote class's own __new__ gets only the message (OSError's would read our other
        # arguments as errno, strerror, filename)
        return super().__new__(cls, message)

    def __init__(self, message: str, exc_type: str | None, remote_traceback: str, job_id: str, image: str,
                 what: str = "the cell") -> None:
        Exception.__init__(self, message)  # not the remote class's __init__, whose arguments are not known here
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.job_id = job_id
        self.image = image
        self.what = what

    def __str__(self) -> str:
        return (f"{self.args[0]}\n\nin job {self.job_id} (image {self.image}); remote traceback:\n"
                f"{self.remote_traceback}" + (f"\n{self.hint}" if self.hint else ""))

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of the kernel-side stack, which says nothing useful."""
        return [f"RemoteError: {self.what} failed in its container (job {self.job_id}, image {self.image})",
                *self.remote_traceback.rstrip("\n").split("\n"), *([self.hint] if self.hint else [])]

    @property
    def hint(self) -> str:
        """What to do about a module the job's image lacks (empty for other errors): the kernel's
        version of it, as --pip takes it."""
        match = _MISSING_MODULE.search(self.args[0]) if self.exc_type == "ModuleNotFoundError" else None
        module = match.group(1).partition(".")[0] if match else ""
        if not installable(module):
            return ""
        table = version_table({module: None})
        if "fix:" in table:
            return f"the image {self.image} has no module {module!r}; {table}"
        return (f"the image {self.image} has no module {module!r}, nor has the kernel: install it for the job with "
                f"--pip <its package> (pip=[...] for submit and remote), or use an image that has it")


_MISSING_MODULE = re.compile(r"No module named '([^']+)'")


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


_remote_error_classes: dict[type[Exception], type[RemoteError]] = {}


def _loaded_exception_class(module: str | None, qualname: str | None, name: str | None) -> type[Exception] | None:
    """The kernel's class of that module and qualified name, if the module is loaded in the kernel
    (as it is wherever code names the class in an ``except``). Nothing is imported for a message
    from a worker."""
    found: Any = sys.modules.get(module or "")
    for part in (qualname or "").split("."):
        found = getattr(found, part, None)
    # not a SyntaxError: IPython shows those from their attributes, which stay in the container,
    # instead of the remote traceback
    if isinstance(found, type) and issubclass(found, Exception) and not issubclass(found, SyntaxError) \
            and found.__name__ == name:
        return found
    return None


def _remote_error_class(original: type[Exception]) -> type[RemoteError]:
    """A RemoteError that is also an ``original`` (made once per class); RemoteError itself where
    the two cannot be combined."""
    if issubclass(original, CeleryNBError):
        return RemoteError
    combined = _remote_error_classes.get(original)
    if combined is None:
        try:
            combined = type("RemoteError", (RemoteError, original),
                            {"__module__": __name__, "__qualname__": f"RemoteError[{original.__qualname__}]"})
        except Exception:  # e.g. a TypeError for layouts that do not combine, or the class's __init_subclass__
            combined = RemoteError
        _remote_error_classes[original] = combined
    return combined


def error_from_event(error: dict[str, Any], job_id: str, image: str, what: str = "the cell") -> CeleryNBError:
    """Rebuild the exception described by a job's final event (``what`` ran: "the cell", or a
    function's label)."""
    if error["kind"] == "remote":
        args = (error["message"], error.get("exc_type"), error.get("traceback") or "", job_id, image, what)
        original = _loaded_exception_class(error.get("exc_module"), error.get("exc_qualname"), error.get("exc_type"))
        if original is not None:
            try:
                return _remote_error_class(original)(*args)
            except Exception:  # a class whose construction needs more than a message: the name will do
                pass
        return RemoteError(*args)
    message = error["message"]
    if error.get("packages") or error.get("python"):  # a value or function the environment could not load
        message = f"{message}\n{version_table(error.get('packages') or {}, error.get('python'))}"
    return _KINDS.get(error["kind"], ContainerError)(message)


def error_kind(exc: CeleryNBError) -> str:
    """The "kind" under which the worker reports ``exc`` (inverse of error_from_event)."""
    return next((kind for kind, cls in _KINDS.items() if type(exc) is cls), "container")

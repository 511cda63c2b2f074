"""``%%celery_docker``, ``%celery_jobs``, ``%celery_attach``: a thin layer over the public API
(no Celery or Docker here)."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from celery_nb.client import default_client
from celery_nb.errors import CeleryNBError
from celery_nb.job import Job
from celery_nb.kernel_hooks import between_cells
from celery_nb.options import JobOptions
from celery_nb.widgets import JobView, jobs_view

F = TypeVar("F", bound=Callable[..., Any])


def names_flag(value: str | None) -> list[str] | None:
    """``--in a,b`` / ``--out c,d``: variable names."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"not variable names: {', '.join(map(repr, bad))} (use --in a,b / --out c,d)")
    return names


def job_option_flags(func: F) -> F:
    """The magic's flags for every JobOptions field (generated from the fields' metadata)."""
    for flags, kwargs in reversed(JobOptions.magic_arguments()):
        func = argument(*flags, **kwargs)(func)
    return func


@magics_class
class CeleryDockerMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._between_cells = between_cells(shell)

    @magic_arguments()
    @argument("--in", dest="inputs", metavar="A,B",
              help="kernel variables to send (default: the names the cell reads that the kernel has)")
    @argument("--out", dest="outputs", metavar="C,D",
              help="variables to bring back (default: every name the cell assigns); a name the cell "
                   "never assigns is an error")
    @job_option_flags
    @argument("--no-wait", action="store_true",
              help="return the Job at once; its outputs land in the namespace when it finishes")
    @cell_magic
    def celery_docker(self, line: str, cell: str) -> Job | None:
        """Run this cell in a Docker container through Celery, and bring its variables back.

        The cell's inputs are the variables it reads that exist in the kernel; its outputs
        are the variables it assigns. While it runs the cell shows status, progress
        (``celery_nb_runtime.progress`` or tqdm in the container), the live output, the
        elapsed time and a Cancel button; Ctrl-C / Interrupt also cancels it. ``display(obj)``
        in the cell, matplotlib figures and the value of its last expression (unless a ``;``
        ends it) show below the widget. A failed or cancelled cell leaves the namespace
        untouched. Top-level ``await``, ``!cmd``, ``x = !cmd``, ``%time``, ``%timeit`` and
        ``%%time`` work as in IPython; other magics would need IPython in the container and
        are refused before anything is submitted.

        Example::

            %%celery_docker --image python:3.12-slim --memory 2g --timeout 600
            import numpy as np
            u, s, vt = np.linalg.svd(big_matrix)
        """
        args = parse_argstring(self.celery_docker, line)
        shell = self.shell
        job = default_client().submit_cell(
            cell, shell.user_ns, inputs=names_flag(args.inputs), outputs=names_flag(args.outputs), first_line=2,
            hidden=shell.user_ns_hidden, options=JobOptions.from_flags(vars(args)))
        return self._show_and_collect(job, args.no_wait)

    @magic_arguments()
    @argument("--limit", type=int, default=20, help="jobs of earlier kernels to list at most (default: 20)")
    @line_magic
    def celery_jobs(self, line: str) -> Any:
        """A live table of this kernel's jobs and of the jobs earlier kernels on this machine
        sent to the same broker (e.g. before a restart): status, image, worker, time queued,
        starting and running, progress, and a Cancel button for those still going.
        ``%celery_attach JOB_ID`` follows one of them again and collects its outputs."""
        args = parse_argstring(self.celery_jobs, line)
        return jobs_view(default_client().known_jobs(limit=args.limit))

    @magic_arguments()
    @argument("job_id", help="the job's id, or its first characters as the widget shows them")
    @argument("--no-wait", action="store_true",
              help="return the Job at once; a cell's outputs land in the namespace when it finishes")
    @line_magic
    def celery_attach(self, line: str) -> Any:
        """Follow a job again, e.g. one sent before the kernel restarted: shows its widget with
        the logs and progress so far, waits for it, and puts a cell's variables into the
        namespace (a function's return value is the result). Interrupting stops the waiting,
        not the job."""
        args = parse_argstring(self.celery_attach, line)
        return self._show_and_collect(default_client().attach(args.job_id), args.no_wait, cancel_on_interrupt=False)

    def _show_and_collect(self, job: Job, no_wait: bool, cancel_on_interrupt: bool = True) -> Any:
        """Show the job and bring its outputs back: a cell's into the namespace, a function's
        return value as the result."""
        if no_wait:
            # the job ends on the follower's thread, maybe while another cell runs: its outputs
            # land on the main thread, between cells
            job.add_done_callback(lambda job: self._between_cells.call(lambda: self._land_outputs(job)))
            return job  # displayed as the cell's result: the live widget
        JobView(job).wait(cancel_on_interrupt)
        if job.kind == "call":
            return job.result()
        self.shell.user_ns.update(job.result())
        return None

    def _land_outputs(self, job: Job) -> None:
        """A ``--no-wait`` cell's variables, into the namespace (on the main thread, between cells)."""
        if job.status == "succeeded" and job.kind == "cell":
            try:
                self.shell.user_ns.update(job.result())
            except CeleryNBError as exc:
                print(f"[celery_nb] the outputs of job {job.id[:12]} ({job.label}) did not land: {exc}",
                      file=sys.stderr)

"""How a job looks in the notebook: a live ipywidget, drawn from the job's events only (or,
for a blocking cell's job that ends at once, the same view in HTML).

Outside a widget frontend (terminal IPython, nbconvert, GitHub) the same display has a
readable ``text/plain`` form that is updated when the job ends.
"""
from __future__ import annotations

import concurrent.futures
import functools
import html
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w
from ipywidgets.widgets.widget_string import HTMLStyle
from IPython import get_ipython
from IPython.display import display

from celery_nb.job import Job, JobFuture, collapse_carriage_returns
from celery_nb.errors import JobCancelled
from celery_nb.kernel_hooks import again_between_cells, send_state_again, serve_while_busy
from celery_nb.options import format_size

LOG_TAIL_LINES = 30
DOWNLOADS_LISTED = 20  # files named in a job's view; more are counted
# Colours come from JupyterLab's theme (its CSS variables), so that light and dark themes both
# read well, with fixed ones where there is no theme. A status badge is white text on the strong
# shade of its status's colour; the jobs table writes the status in the normal shade.
_STATUS_BADGE = {"queued": "var(--jp-layout-color4,#6c757d)", "starting": "var(--jp-brand-color0,#0d6efd)",
                 "building": "var(--jp-accent-color0,#6f42c1)", "running": "var(--jp-brand-color0,#0d6efd)", "succeeded": "var(--jp-success-color0,#198754)",
                 "failed": "var(--jp-error-color0,#dc3545)", "cancelled": "var(--jp-warn-color0,#fd7e14)"}
_STATUS_TEXT = {"queued": "var(--jp-ui-font-color2,#6c757d)", "starting": "var(--jp-brand-color1,#0d6efd)",
                "building": "var(--jp-accent-color1,#6f42c1)", "running": "var(--jp-brand-color1,#0d6efd)", "succeeded": "var(--jp-success-color1,#198754)",
                "failed": "var(--jp-error-color1,#dc3545)", "cancelled": "var(--jp-warn-color1,#fd7e14)"}
_BORDER = "var(--jp-border-color2,#ddd)"
_LOG_BOX = "background:var(--jp-cell-editor-background,#f8f9fa);color:var(--jp-content-font-color1,#212529)"
_STDERR = "var(--jp-error-color1,#b02a37)"
_ERROR = "var(--jp-error-color1,#dc3545)"
_MUTED = "var(--jp-ui-font-color2,#6c757d)"
_LINE = re.compile(r"[^\n]*\n|[^\n]+")
_MIN_REDRAW_INTERVAL = 0.1  # s; log floods must not flood the frontend with comm messages
_REDRAW_SHARE = 0.1  # of a core at most, however long a redraw takes (a big log)
_LINE_CHARS = 1000  # of a log line, shown in the widget (a job may print a line of 100 MB)
_LIVE_AFTER = 0.2  # s: a blocking cell's job not ended by then is shown by the live widget


def in_kernel() -> bool:
    """True inside a Jupyter kernel (widgets possible), False in terminal IPython or plain Python."""
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def log_tail(job: Job, lines: int = LOG_TAIL_LINES) -> list[tuple[str, str]]:
    """The last ``lines`` lines as (stream, text), as a terminal shows them: a carriage return
    redraws its line (tqdm, ``print(..., end="\\r")``)."""
    joined: list[tuple[str, str]] = []
    for stream, text in job.log_chunks():
        for piece in _LINE.findall(text):
            if joined and joined[-1][0] == stream and not joined[-1][1].endswith("\n"):
                piece = joined.pop()[1] + piece
            joined.append((stream, piece))
    tail = []
    for stream, text in joined[-lines:]:
        shown = collapse_carriage_returns(text.rstrip("\n"))
        if shown.strip():
            tail.append((stream, shown + "\n"))
    return tail


def downloads_text(job: Job) -> str:
    """What the job's --download patterns brought back, with sizes, and which matched nothing
    ("" when it asked for no files)."""
    parts = []
    if job.downloads:
        listed = [f"{path} ({format_size(size)})" for path, size in list(job.downloads.items())[:DOWNLOADS_LISTED]]
        more = len(job.downloads) - len(listed)
        parts.append("files back: " + ", ".join(listed) + (f" and {more} more" if more else ""))
    if job.unmatched_downloads:
        parts.append("no file matched --download " + ", ".join(job.unmatched_downloads))
    return "; ".join(parts)


@functools.cache
def _shared_layout(**properties: str) -> w.Layout:
    """One Layout of ``properties`` for all the views' parts that never change theirs (a kernel's
    widgets may share a layout, and each layout costs a comm)."""
    return w.Layout(**properties)


@functools.cache
def _shared_html_style() -> HTMLStyle:
    return HTMLStyle()


def _widget_bundle(widget: w.DOMWidget, text: str) -> dict[str, Any]:
    """How ``widget`` displays, with ``text`` as its text/plain: ipywidgets' own
    _repr_mimebundle_ first writes the repr of the whole widget tree (milliseconds a display)."""
    return {"text/plain": text, "application/vnd.jupyter.widget-view+json":
            {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}}


def _status_html(job: Job) -> str:
    colour = _STATUS_BADGE.get(job.status, _STATUS_BADGE["queued"])
    shown = "building environment" if job.status == "building" else job.status
    return (f'<span class="celery-nb-status" style="background:{colour};color:white;'
            f'border-radius:4px;padding:1px 8px;font-weight:bold">{shown}</span>')


def _title_html(job: Job) -> str:
    worker = f" on <b>{html.escape(job.worker)}</b>" if job.worker else ""
    if job.container:
        worker += f" ({job.container} container)"
    if job.environment:  # --pip: the worker host had the job's environment, or built it
        worker += f' · <span class="celery-nb-environment">environment {job.environment}</span>'
    if job.attempts > 1:  # its first worker died; the job ran again from the start
        worker += f' · <span class="celery-nb-attempt">attempt {job.attempts}</span>'
    return (f'<span class="celery-nb-title">&nbsp;<code>{html.escape(job.image)}</code>{worker} · job '
            f'<code title="{job.id}">{job.id[:12]}</code> · {html.escape(job.label[:60])}</span>')


def _elapsed_html(job: Job) -> str:
    return f'<span class="celery-nb-elapsed">{job.elapsed:.1f} s</span>&nbsp;'


def _progress_label_html(job: Job) -> str:
    return f'&nbsp;<span class="celery-nb-progress">{html.escape(job.progress_text())}</span>'


def _logs_html(job: Job) -> str:
    lines = log_tail(job)
    if not lines:
        return ""
    # column-reverse keeps the box scrolled to its newest line
    return ('<div style="max-height:16em;overflow:auto;display:flex;flex-direction:column-reverse;'
            f'{_LOG_BOX};margin:4px 0"><pre class="celery-nb-logs" style="margin:0;padding:4px;color:inherit;'
            'font-size:12px;line-height:1.3">'
            + "".join(f'<span style="color:{_STDERR}">{html.escape(_clipped(t))}</span>' if s == "stderr"
                      else html.escape(_clipped(t)) for s, t in lines)
            + "</pre></div>")


def _downloads_html(job: Job) -> str:
    downloads = downloads_text(job)
    return f'<div class="celery-nb-downloads" style="margin:2px 0">{html.escape(downloads)}</div>' if downloads else ""


def _end_html(job: Job) -> str:
    """A finished job's error, timing breakdown and usage."""
    parts = " · ".join(f"{k} {v:.2f} s" for k, v in job.timing_breakdown().items())
    error = (f'<div style="color:{_ERROR}">{html.escape(str(job.error).splitlines()[0])}</div>'
             if job.error is not None else "")
    usage = (f'<span class="celery-nb-usage" style="color:{_MUTED}"> · {html.escape(job.usage_text())}</span>'
             if job.usage else "")
    return f'{error}<span class="celery-nb-timings" style="color:{_MUTED}">{parts}</span>{usage}'


def finished_html(job: Job) -> str:
    """A finished job as its widget last draws it, in plain HTML (no widget to open, and shown
    wherever HTML is, nbconvert and GitHub included): for a job that ends as its cell starts."""
    progress = ""
    if job.progress:
        total = job.progress["total"] or 0
        done = min(job.progress["n"], total) / total if total else 0
        colour = {"succeeded": _STATUS_BADGE["succeeded"], "failed": _STATUS_BADGE["failed"]}.get(
            job.status, _STATUS_BADGE["running"])
        progress = ('<div style="display:flex;align-items:center;margin:4px 0"><div style="flex:1 1 auto;height:8px;'
                    f'background:{_BORDER}"><div class="celery-nb-bar" style="width:{done * 100:.1f}%;height:100%;'
                    f'background:{colour}"></div></div>{_progress_label_html(job)}</div>')
    return (f'<div class="celery-nb-job" style="border:1px solid {_BORDER};padding:4px 8px;margin:2px 0">'
            f'<div style="display:flex;align-items:center">{_status_html(job)}'
            f'<span style="flex:1 1 auto">{_title_html(job)}</span>{_elapsed_html(job)}</div>'
            f'{progress}{_logs_html(job)}{_downloads_html(job)}<div>{_end_html(job)}</div></div>')


class _RedrawnOnEvents:
    """A view that redraws when its jobs' events arrive (throttled) and when they end; a job
    that ends between cells has the view's state sent again in the next (kernel_hooks.again_between_cells)."""

    _drawn_at = 0.0
    _redraw_took = 0.0  # s, the last throttled redraw
    _sending_again = False  # the view's state is due to be sent again (once for the jobs that end before)

    def _follow(self, jobs: list[Job]) -> None:
        self.redraw()
        for job in jobs:
            job.add_listener(self._on_change)
            job.add_done_callback(self._on_end)

    def _on_end(self, _job: Job) -> None:
        self.redraw()
        if not self._sending_again:
            self._sending_again = again_between_cells(self._send_again)

    def _send_again(self) -> None:
        self._sending_again = False
        send_state_again(self)  # type: ignore[arg-type]  # (the views are widgets)

    def _on_change(self, _job: Job) -> None:
        started = time.monotonic()
        if started - self._drawn_at >= max(_MIN_REDRAW_INTERVAL, self._redraw_took / _REDRAW_SHARE):
            self.redraw()
            self._redraw_took = time.monotonic() - started

    def redraw(self) -> None:
        self._drawn_at = time.monotonic()


class JobWidget(_RedrawnOnEvents, w.VBox):
    """Status, progress bar, live log tail, elapsed time, Cancel button, timing breakdown, and
    (``show_displays``) what the job displays: figures, HTML."""

    def __init__(self, job: Job, show_displays: bool = True) -> None:
        self.job = job
        self.displays = w.Output() if show_displays else None
        # each widget opens a comm with its state (about half a millisecond here): the parts that
        # never change their layout share one, and the progress row is made when progress comes
        self.status = w.HTML(layout=_shared_layout(), style=_shared_html_style())
        self.title = w.HTML(layout=_shared_layout(flex="1 1 auto"), style=_shared_html_style())
        self.elapsed = w.HTML(layout=_shared_layout(), style=_shared_html_style())
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="warning",
                                      tooltip="Stop the container and mark the job cancelled",
                                      layout=w.Layout(width="auto"))
        self.cancel_button.on_click(lambda _b: job.cancel())
        self.bar: w.FloatProgress | None = None
        self.bar_label: w.HTML | None = None
        self.logs = w.HTML(layout=_shared_layout(), style=_shared_html_style())
        self.downloads = w.HTML(layout=_shared_layout(), style=_shared_html_style())
        self.timings = w.HTML(layout=_shared_layout(), style=_shared_html_style())
        super().__init__([
            w.HBox([self.status, self.title, self.elapsed, self.cancel_button],
                   layout=w.Layout(align_items="center", justify_content="space-between")),
            self.logs,
            *([self.displays] if self.displays is not None else []),
            self.downloads,
            self.timings,
        ], layout=w.Layout(border=f"1px solid {_BORDER}", padding="4px 8px", margin="2px 0"))
        self._follow([job])

    def _progress_row(self) -> tuple[w.FloatProgress, w.HTML]:
        """The progress bar and its label, below the first line (made at the job's first progress)."""
        if self.bar is None or self.bar_label is None:
            self.bar = w.FloatProgress(value=0, min=0, max=1, layout=_shared_layout(flex="1 1 auto"))
            self.bar_label = w.HTML(layout=_shared_layout(), style=_shared_html_style())
            row = w.HBox([self.bar, self.bar_label], layout=w.Layout(align_items="center"))
            self.children = (self.children[0], row, *self.children[1:])
        return self.bar, self.bar_label

    def redraw(self) -> None:
        super().redraw()
        job = self.job
        self.status.value = _status_html(job)
        self.title.value = _title_html(job)
        self.elapsed.value = _elapsed_html(job)
        if job.finished:
            self.cancel_button.layout.display = "none"
        if job.progress:
            bar, label = self._progress_row()
            total = job.progress["total"] or 0
            bar.max = total if total else 1
            bar.value = min(job.progress["n"], bar.max) if total else 0
            bar.bar_style = "success" if job.status == "succeeded" else ("danger" if job.status == "failed" else "")
            label.value = _progress_label_html(job)
        self.logs.value = _logs_html(job)
        if self.displays is not None:
            shown = len(self.displays.outputs)
            self.displays.outputs += tuple({"output_type": "display_data", **bundle}
                                           for bundle in job.displays[shown:])
        downloads = _downloads_html(job)
        if downloads:
            self.downloads.value = downloads
        if job.finished:
            self.timings.value = _end_html(job)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _widget_bundle(self, text_summary(self.job))


_TABLE_COLUMNS = ("job", "what", "image", "status", "worker", "queued", "start", "run", "progress", "peak memory",
                  "CPU", "")


def _seconds(parts: dict[str, float], phase: str) -> str:
    return f"{parts[phase]:.1f} s" if phase in parts else ""


def _table_row(job: Job) -> list[str]:
    """The text of a job's row in the jobs table (the last column is its Cancel button)."""
    parts = job.timing_breakdown()
    usage = job.usage
    return [job.id[:12], job.label[:40], job.image, job.status, job.worker or "", _seconds(parts, "queued"),
            _seconds(parts, "start"), _seconds(parts, "run"), job.progress_text(),
            f"{format_size(usage['peak_memory'])} of {format_size(usage['memory_limit'])}" if usage else "",
            f"{usage['cpu_seconds']:.2f} s" if usage else "", ""]


def jobs_text_table(jobs: list[Job]) -> str:
    """The jobs table as aligned text (terminal IPython, nbconvert, GitHub)."""
    if not jobs:
        return "no celery_nb jobs yet"
    rows = [list(_TABLE_COLUMNS[:-1]), *(_table_row(job)[:-1] for job in jobs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


class JobsTable(_RedrawnOnEvents, w.GridBox):
    """``%celery_jobs``: a live row per job (status, image, worker, queue/start/run times,
    progress) with a Cancel button for those still going."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        header = [w.HTML(f"<b>{name}</b>") for name in _TABLE_COLUMNS]
        self._rows: list[tuple[list[w.HTML], w.Button]] = []
        cells: list[w.Widget] = list(header)
        for job in jobs:
            texts = [w.HTML() for _ in _TABLE_COLUMNS[:-1]]
            button = w.Button(description="Cancel", icon="stop", button_style="warning",
                              tooltip=f"Stop job {job.id} and mark it cancelled", layout=w.Layout(width="auto"))
            button.on_click(lambda _b, job=job: job.cancel())
            self._rows.append((texts, button))
            cells += [*texts, button]
        super().__init__(cells, layout=w.Layout(grid_template_columns=f"repeat({len(_TABLE_COLUMNS)}, max-content)",
                                                grid_gap="0 16px", align_items="center", overflow="auto"))
        self._follow(jobs)

    def redraw(self) -> None:
        super().redraw()
        for job, (texts, button) in zip(self.jobs, self._rows):
            row = _table_row(job)
            for cell, text in zip(texts, row):
                cell.value = f'<span style="white-space:nowrap">{html.escape(text)}</span>'
            texts[0].value = f'<code title="{job.id}">{row[0]}</code>'
            colour = _STATUS_TEXT.get(job.status, _STATUS_TEXT["queued"])
            texts[3].value = f'<span class="celery-nb-status" style="color:{colour};font-weight:bold">{job.status}</span>'
            # hidden, not removed: the grid's cells must stay in their columns
            button.layout.visibility = "hidden" if job.finished else "visible"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _widget_bundle(self, jobs_text_table(self.jobs))


def jobs_view(jobs: list[Job]) -> Any:
    """What ``%celery_jobs`` returns: the live table in a kernel, text elsewhere."""
    if in_kernel():
        return JobsTable(jobs)
    print(jobs_text_table(jobs))
    return None


def _clipped(line: str) -> str:
    """A log line as the widget shows it: its start, when it is very long."""
    text = line.rstrip("\n")
    if len(text) <= _LINE_CHARS:
        return line
    return f"{text[:_LINE_CHARS]} ... ({len(text) - _LINE_CHARS} more characters)\n"


def text_summary(job: Job) -> str:
    tail = "".join(t for _s, t in log_tail(job, 10))
    downloads = downloads_text(job)
    return job.summary() + (("\n" + tail.rstrip("\n")) if tail else "") + (f"\n{downloads}" if downloads else "")


class TextProgress:
    """The terminal view: status changes, log output and displays (as text) printed as they arrive."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._status = None
        self._printed = 0  # output items printed (Job.new_output)
        job.add_listener(self.update)
        job.add_done_callback(self.update)

    def update(self, job: Job) -> None:
        items, self._printed = job.new_output(self._printed)
        for kind, item in items:
            if kind == "display":
                print(item["data"].get("text/plain", ""), flush=True)
            else:
                (sys.stderr if kind == "stderr" else sys.stdout).write(item)
        if job.status != self._status:
            self._status = job.status
            print(f"[celery_nb] {job.summary()}", file=sys.stderr, flush=True)
            if job.finished and downloads_text(job):
                print(f"[celery_nb] {downloads_text(job)}", file=sys.stderr, flush=True)


class JobView:
    """A job's display: the live widget in a kernel, printed text elsewhere.

    ``blocking``: the cell waits for the job (``wait()``); what the job displays (figures, HTML)
    then becomes the cell's own outputs below the widget - so a saved notebook shows them where
    widgets are not rendered (nbconvert, GitHub) - and the terminal prints the job as it runs.
    A job that ends within _LIVE_AFTER s is shown ended, in HTML that looks as the widget would.
    Otherwise the widget shows them, and the terminal prints the job's state once.
    """

    def __init__(self, job: Job, blocking: bool = True) -> None:
        self.job = job
        self._displayed = 0
        self._in_kernel = in_kernel()
        if not self._in_kernel:
            if blocking:
                TextProgress(job)
            else:
                print(text_summary(job))
        elif not blocking:  # (a blocking cell's view is made by wait())
            self._show_widget(show_displays=True)

    def _show_widget(self, show_displays: bool) -> JobWidget:
        widget = JobWidget(self.job, show_displays)
        handle = display(widget, display_id=True)

        def ended(_job: Job) -> None:  # once final, refresh the text/plain that nbconvert and GitHub show
            handle.update(widget)
            again_between_cells(lambda: handle.update(widget))
        self.job.add_done_callback(ended)
        return widget

    def _show_new_displays(self) -> None:
        for bundle in self.job.displays[self._displayed:]:
            display(bundle["data"], metadata=bundle["metadata"], raw=True)
            self._displayed += 1

    def wait(self, cancel_on_interrupt: bool = True) -> None:
        """Block until the job is final while its displays appear and its Cancel button keeps
        working (its clicks are served on a kernel subshell meanwhile).

        A kernel interrupt (Ctrl-C, the Interrupt button) cancels the job, waits for the
        worker to confirm, and re-raises KeyboardInterrupt (without ``cancel_on_interrupt``,
        it only stops the waiting).
        """
        try:
            if not self._in_kernel:
                self.job.wait()
                return
            # a job that ends within _LIVE_AFTER is shown ended, in HTML: a widget's comms would
            # take longer than the job (the warm trivial cell); a longer one gets the live widget
            if not self.job.wait(_LIVE_AFTER):
                serve_while_busy(self._show_widget(show_displays=False).cancel_button)
                while not self.job.wait(0.05):
                    self._show_new_displays()
            else:
                display({"text/html": finished_html(self.job), "text/plain": text_summary(self.job)}, raw=True)
            self._show_new_displays()
        except KeyboardInterrupt:
            if cancel_on_interrupt:
                self.job.cancel()
                self.job.wait(5)
            raise


class ParallelView:
    """A joblib Parallel call on celery_nb (celery_nb.joblib_backend) in the notebook: one live
    line for all its batches (each a job once sent) - the tasks done of those sent (of all, when
    joblib knows how many), the batches waiting, running and ended, the time so far, and a Cancel
    button that stops them all - and at the end what its jobs used. Its saved text says how it ended.

    ``batches``: the call's batch futures with their number of tasks, appended to as joblib sends
    them; ``cancel`` stops them all.
    """

    _TICK = 0.2  # s between redraws; batches held in the kernel have no events to redraw on
    _SETTLING = 5.0  # s that finish() waits for stopped jobs to end (their workers confirm)

    def __init__(self, batches: list[tuple[JobFuture, int]], total: int | None, cancel: Callable[[], None]) -> None:
        self._batches = batches
        self._total = total
        self._started = time.monotonic()
        self._ended: float | None = None
        self._lock = threading.Lock()
        self.status = w.HTML()
        self.title = w.HTML(layout=w.Layout(flex="1 1 auto"))
        self.elapsed = w.HTML()
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="warning",
                                      tooltip="Stop all the jobs of this joblib call", layout=w.Layout(width="auto"))
        self.cancel_button.on_click(lambda _b: cancel())
        self.bar = w.FloatProgress(value=0, min=0, max=1, layout=w.Layout(flex="1 1 auto"))
        self.end = w.HTML()
        self.widget = w.VBox([
            w.HBox([self.status, self.title, self.elapsed, self.cancel_button],
                   layout=w.Layout(align_items="center", justify_content="space-between")),
            self.bar, self.end], layout=w.Layout(border=f"1px solid {_BORDER}", padding="4px 8px", margin="2px 0"))
        self.redraw()
        self._handle = display(self, display_id=True)
        serve_while_busy(self.cancel_button)  # the cell blocks in joblib meanwhile
        self._stop_ticking = threading.Event()
        threading.Thread(target=self._tick, name="celery_nb-joblib-view", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop_ticking.wait(self._TICK):
            self.redraw()

    def finish(self) -> None:
        """The call has ended: once its stopped jobs have ended too, the last redraw, which its saved text keeps."""
        self._stop_ticking.set()
        concurrent.futures.wait([future for future, _tasks in self._batches], timeout=self._SETTLING)
        self._ended = time.monotonic()
        self.redraw()
        self._handle.update(self)

    def outcome(self) -> str:
        """running, succeeded, failed (a batch raised) or cancelled (a batch's job was)."""
        futures = [future for future, _tasks in self._batches]
        if self._ended is None:
            return "running"
        errors = [future.exception() for future in futures if future.done() and not future.cancelled()]
        if any(future.cancelled() for future in futures) or any(isinstance(e, JobCancelled) for e in errors):
            return "cancelled"
        return "failed" if any(errors) else "succeeded"

    def counts(self) -> dict[str, int]:
        """Tasks sent and done (in batches that succeeded); batches waiting (held in the kernel, or
        their jobs queued), running and ended."""
        counts = dict.fromkeys(("sent", "done", "waiting", "running", "ended"), 0)
        for future, tasks in list(self._batches):
            counts["sent"] += tasks
            if future.done():
                counts["ended"] += 1
                counts["done"] += tasks if not future.cancelled() and future.exception() is None else 0
            else:
                counts["running" if future.running() else "waiting"] += 1
        return counts

    def usage_text(self) -> str:
        """The CPU time of the call's jobs, and the largest peak memory of one of them against its limit."""
        usages = [future.job.usage for future, _tasks in list(self._batches) if future.job and future.job.usage]
        if not usages:
            return ""
        peak = max(usages, key=lambda usage: usage["peak_memory"])
        return (f"CPU {sum(usage['cpu_seconds'] for usage in usages):.2f} s in all, largest peak "
                f"{format_size(peak['peak_memory'])} of {format_size(peak['memory_limit'])}")

    def progress_text(self) -> str:
        """e.g. "12/30 tasks in 8 batches (2 waiting, 4 running, 2 ended)"."""
        c = self.counts()
        return (f"{c['done']}/{self._total or c['sent']} tasks in {len(self._batches)} batches ({c['waiting']} "
                f"waiting, {c['running']} running, {c['ended']} ended)")

    def summary(self) -> str:
        """One line: how the call went, its tasks and batches, what its jobs used."""
        elapsed = (self._ended or time.monotonic()) - self._started
        usage = self.usage_text()
        return (f"celery_nb joblib call: {self.outcome()} after {elapsed:.1f} s | {self.progress_text()}"
                + (f" | {usage}" if usage else ""))

    def redraw(self) -> None:
        with self._lock:
            c = self.counts()
            outcome = self.outcome()
            self.status.value = (f'<span class="celery-nb-status" style="background:{_STATUS_BADGE[outcome]};'
                                 f'color:white;border-radius:4px;padding:1px 8px;font-weight:bold">{outcome}</span>')
            self.title.value = f'<span class="celery-nb-title">&nbsp;joblib: {html.escape(self.progress_text())}</span>'
            elapsed = (self._ended or time.monotonic()) - self._started
            self.elapsed.value = f'<span class="celery-nb-elapsed">{elapsed:.1f} s</span>&nbsp;'
            self.bar.max = max(self._total or c["sent"], 1)
            self.bar.value = c["done"]
            self.bar.bar_style = {"succeeded": "success", "failed": "danger", "cancelled": "warning"}.get(outcome, "")
            if self._ended is not None:
                self.cancel_button.layout.display = "none"
                self.end.value = (f'<span class="celery-nb-usage" style="color:{_MUTED}">'
                                  f'{html.escape(self.usage_text())}</span>')

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _widget_bundle(self.widget, self.summary())


def _show_live(job: Job) -> None:
    """How a Job displays in a notebook: the live widget, whose saved text is brought up to date
    when the job ends."""
    JobView(job, blocking=False)


Job.live_view = _show_live

"""The kernel's copy of a job's output, bounded the way the worker bounds the event stream
(celery_nb.worker.logs): up to the "log_cut" event the output is kept whole; past it, the log
text is a window of the newest ``window`` characters, the oldest dropped first, and one line at
the cut says what is missing and where the whole log is."""
from __future__ import annotations

import time
from typing import Any

from celery_nb.jobstore import Event
from celery_nb.options import format_size

Output = list[tuple[str, Any]]  # ("stdout"|"stderr", text) or ("display", bundle), in order


class LogWindow:
    """Keeps a job's output list bounded; the Job calls it as log events arrive."""

    def __init__(self) -> None:
        self.cut_at: int | None = None  # the index of the line that says what was dropped
        self.end: Event | None = None  # the worker's "log_end" event: what it dropped, where the whole log is
        self.trimmed = 0  # output items dropped from the window
        self._cut: Event = {}
        self._kept = 0  # characters of log text in the window
        self._line_start = ""

    def cut(self, output: Output, event: Event) -> None:
        """The worker's "log_cut" event: from here on only a window of the newest output stays."""
        self._cut = event
        self.cut_at = len(output)
        last_text = next((text for kind, text in reversed(output) if kind != "display"), "\n")
        self._line_start = "" if last_text.endswith("\n") else "\n"  # the line stands on a line of its own
        output.append(("stderr", self._line_start + self._line()))

    def added(self, output: Output) -> None:
        """A log item was appended to ``output``: drop the window's oldest text beyond its size."""
        if self.cut_at is None:
            return
        self._kept += len(output[-1][1])
        index = self.cut_at + 1
        while self._kept > self._cut["window"] and index < len(output):
            kind, text = output[index]
            excess = self._kept - self._cut["window"]
            if kind == "display":
                index += 1
            elif len(text) <= excess:
                del output[index]
                self._kept -= len(text)
                self.trimmed += 1
            else:  # its newest part stays, from a line's start where there is one
                start = text.find("\n", excess - 1) + 1 or excess
                output[index] = (kind, text[start:])
                self._kept -= start

    def ended(self, output: Output, event: Event) -> None:
        """The worker's "log_end" event: the line at the cut gets the final numbers."""
        self.end = event
        if self.cut_at is not None:
            output[self.cut_at] = ("stderr", self._line_start + self._line())

    def index_after(self, seen: int) -> int:
        """Where, in the output list, the items after the first ``seen`` ever added are now."""
        if self.cut_at is None or seen <= self.cut_at:
            return seen
        return max(seen - self.trimmed, self.cut_at + 1)

    def _line(self) -> str:
        cut = self._cut
        if self.end is None:
            return (f"[celery_nb] output goes on past the first {format_size(cut['kept'])}: only the newest "
                    f"{format_size(cut['window'])} of the rest is kept (CELERY_NB_MAX_LOG_BYTES={cut['limit']})\n")
        end = self.end
        line = (f"[celery_nb] {format_size(end['dropped'])} of output dropped here: the log keeps the first "
                f"{format_size(cut['kept'])} and the last {format_size(cut['window'])} (CELERY_NB_MAX_LOG_BYTES={cut['limit']}); ")
        whole = end.get("full_log")
        if whole is None:
            return line + "the whole log was not kept (CELERY_NB_MAX_FULL_LOG_BYTES=0)\n"
        until = time.strftime("%H:%M", time.localtime(whole["until"]))
        if whole["size"] < end["printed"]:
            return (line + f"job.full_log() has its first {format_size(whole['size'])} of "
                           f"{format_size(end['printed'])} until {until} (CELERY_NB_MAX_FULL_LOG_BYTES={end['cap']})\n")
        return line + f"job.full_log() has all {format_size(end['printed'])} of it until {until}\n"

"""How celery_nb fits into the IPython shell it runs in: work handed to the shell's main thread
between cells, widget states sent again there, and widget clicks served while a blocking cell
keeps the main thread busy.

ipykernel 7 reads the shell channel in a thread of its own and hands each message to the main
shell (the main thread, busy while a cell runs) or to a subshell (a thread each). A widget's
messages go where the frontend sends them (JupyterLab 4.4+: a subshell of its own, others: the
main shell), except that ipykernel 7.4 sends a comm's messages back to the shell that last sent
on it: the main shell, for a widget a cell made. Either way a click could wait for the blocked
cell. So the button a blocking cell needs meanwhile (Cancel) is routed to a subshell that
celery_nb opens in the kernel.
"""
from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import ipywidgets as w
from IPython import get_ipython

_SUBSHELL_TIMEOUT = 10.0  # s to wait for the kernel's shell channel thread to open the subshell
_subshell_id: str | None = None
_subshell_lock = threading.Lock()
_said = False  # that the Cancel button cannot be served here
_between_cells_lock = threading.Lock()


class BetweenCells:
    """Runs callables on the shell's main thread between cells: after a cell has run
    (``post_run_cell``) and before the next one runs (``pre_run_cell``); never while a cell runs
    and never on another thread. Any thread hands them over with ``call``."""

    def __init__(self, shell: Any) -> None:
        self._pending: deque[Callable[[], None]] = deque()  # appends and pops are thread-safe
        self.cell_running = False  # on the main thread, between its pre_run_cell and post_run_cell
        shell.events.register("pre_run_cell", self._cell_starts)
        shell.events.register("post_run_cell", self._cell_ended)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the main thread once the running cell (if any) has ended."""
        self._pending.append(fn)

    def _cell_starts(self, *_event: Any) -> None:
        if threading.current_thread() is threading.main_thread():  # (not a cell run by a subshell)
            self._run_pending()
            self.cell_running = True

    def _cell_ended(self, *_event: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self.cell_running = False
            self._run_pending()

    def _run_pending(self) -> None:
        while self._pending:
            self._pending.popleft()()


def between_cells(shell: Any) -> BetweenCells:
    """The shell's BetweenCells (made on first use: one per shell, so that what is handed over
    runs once)."""
    with _between_cells_lock:
        if not isinstance(getattr(shell, "_celery_nb_between_cells", None), BetweenCells):
            shell._celery_nb_between_cells = BetweenCells(shell)
        return shell._celery_nb_between_cells


def again_between_cells(send: Callable[[], None]) -> bool:
    """Called by a thread after it sent messages to the frontend (``send()``): when no cell runs
    now, call ``send()`` again on the main thread between cells (and return True).

    A thread's messages sent while no cell runs carry the last cell's id, and reach the frontend
    after that cell's end: a live frontend applies them, but nbclient (nbconvert, papermill) keeps
    only the messages of the cell it runs, so the notebook it saves would show what was before
    them. Sent again from the main thread, they carry the id of the cell that runs. (Messages sent
    while a cell runs reach the frontend before its end: they need nothing.)
    """
    shell = get_ipython()
    if shell is None or threading.current_thread() is threading.main_thread() or between_cells(shell).cell_running:
        return False
    between_cells(shell).call(send)
    return True


def send_state_again(widget: w.Widget) -> None:
    """Send the whole state of ``widget`` and of every widget its state holds (children, layouts,
    styles), once each."""
    sent: set[int] = set()
    held = [widget]
    while held:
        current = held.pop()
        if id(current) in sent or current.comm is None:  # (a closed widget sends nothing)
            continue
        sent.add(id(current))
        # not an Output widget's msg_id (what it captures; unchanged): nbclient 0.11 fails on a
        # state that sets it empty for an Output widget that never had one
        current.send_state(key=[name for name in current.keys if name != "msg_id"])
        for name in current.keys:
            value = getattr(current, name)
            held.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, w.Widget))


def serve_while_busy(widget: w.Widget) -> None:
    """Have ``widget``'s messages from the frontend (a Button's clicks) handled on celery_nb's
    kernel subshell, not by the main shell, whose thread a blocking cell keeps busy. Outside a
    kernel with subshells (terminal IPython, ipykernel 6) nothing changes."""
    subshell = _celery_nb_subshell()
    if subshell is None or widget.comm is None:
        return
    if not hasattr(widget.comm, "_reply_subshell_for"):  # an ipykernel before 7.4, or one that changed it
        _say_once(f"this ipykernel ({type(widget.comm).__module__}) routes no widget messages to subshells")
        return
    # ipykernel's shell channel thread asks a comm where the frontend's messages go. Its own
    # answer is the shell that last sent on the comm: the main shell, for a widget a cell made,
    # even when the frontend (JupyterLab 4.4+) sends the click on a subshell of its own. Here a
    # subshell the frontend named keeps it, and the main shell's go to ours.
    widget.comm._reply_subshell_for = lambda _data, named: named or subshell


def _celery_nb_subshell() -> str | None:
    """The id of the kernel subshell that serves celery_nb's widgets (opened on first use), or
    None outside a kernel with subshells, or when it could not be opened (then said once)."""
    global _subshell_id
    kernel = getattr(get_ipython(), "kernel", None)
    channel = getattr(kernel, "shell_channel_thread", None)
    if channel is None:
        return None
    with _subshell_lock:
        if _subshell_id is None:
            try:
                _subshell_id = _open_subshell(channel)
            except Exception as exc:
                _subshell_id = ""
                _say_once(str(exc))
    return _subshell_id or None


def _say_once(why: str) -> None:
    global _said
    if not _said:
        _said = True
        print(f"[celery_nb] the Cancel button of a blocking cell cannot be served while the cell runs ({why}); "
              f"interrupt the kernel to cancel its job, or use ipykernel 7.4+", file=sys.stderr)


def _open_subshell(channel: Any) -> str:
    """A new subshell, opened as a frontend's create_subshell_request would be: by the kernel's
    subshell manager, on the shell channel thread."""
    manager = channel.manager
    opened: dict[str, Any] = {}
    done = threading.Event()

    def open_there() -> None:
        try:
            opened["id"] = manager._create_subshell()
        except Exception as exc:  # reported on the calling thread
            opened["error"] = exc
        done.set()

    channel.io_loop.add_callback(open_there)
    if not done.wait(_SUBSHELL_TIMEOUT):
        raise RuntimeError(f"its shell channel thread did not open a subshell within {_SUBSHELL_TIMEOUT:g} s")
    if "error" in opened:
        raise RuntimeError(f"opening a subshell failed: {type(opened['error']).__name__}: {opened['error']}")
    return opened["id"]

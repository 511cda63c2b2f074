"""A cell runs in the container as IPython would run it in the kernel.

The kernel has turned IPython syntax into Python with IPython's own input transformers
(``!ls`` -> ``get_ipython().system('ls')``, ``%time f()`` -> ``get_ipython().run_line_magic('time',
'f()')``) and refused every other magic. Here, without IPython:

- the last expression's value is shown (its MIME bundle, as a "display" event), unless a ``;`` ends
  the cell;
- top-level ``await`` works: such code runs in one event loop for the whole cell;
- ``get_ipython()`` is a stand-in with ``system`` and ``getoutput`` (the container's shell, ``{expr}``
  and ``$name`` expanded as IPython does) and the ``%time``, ``%timeit`` and ``%%time`` magics.

Stdlib only and Python 3.9 compatible: this module runs in any image.
"""
from __future__ import annotations

import ast
import os
import re
import sys
import time
from types import CodeType, FrameType
from typing import Any, Dict, Iterator, List, Optional, Tuple

from celery_nb_runtime import rich_output

_CO_COROUTINE = 0x0080  # inspect.CO_COROUTINE (inspect itself is slow to import): code with a top-level await
_TIMEIT_MIN_SECONDS = 0.2  # %timeit picks its loop count as IPython does: the first power of 10 taking this long
_TIMEIT_REPEAT = 7
_ASYNCIO_DIR = os.path.join(os.path.dirname(os.__file__), "asyncio") + os.sep


def run_cell(source: str, filename: str, namespace: Dict[str, Any], timed: bool = False) -> None:
    """Run ``source`` in ``namespace``; show its last expression's value; with ``timed`` (``%%time``)
    print the CPU and wall time it took, before that value, as IPython does."""
    tree = compile(source, filename, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    body = tree.body
    last = body.pop() if body and isinstance(body[-1], ast.Expr) and not _ends_with_semicolon(source, body[-1]) else None
    runner = _Runner()
    clock = _Clock() if timed else None
    try:
        runner.run(compile(ast.Module(body, type_ignores=[]), filename, "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT),
                   namespace)
        if last is not None:
            value = runner.run(compile(ast.Expression(last.value), filename, "eval", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT),
                               namespace)
    finally:
        runner.close()
    if clock is not None:
        print(clock.report())
    if last is not None:
        display_value(value)


def display_value(value: Any) -> None:
    """What IPython's display hook shows for a cell's last expression (nothing for None)."""
    if value is not None:
        rich_output.publish(*rich_output.mime_bundle(value))


def _ends_with_semicolon(source: str, statement: ast.stmt) -> bool:
    """A ``;`` after the cell's last statement hides its value (comments and blank lines aside)."""
    lines = source.split("\n")
    line = lines[statement.end_lineno - 1].encode("utf-8")  # type: ignore[operator]
    rest = line[statement.end_col_offset:].decode("utf-8", "replace")  # a byte offset
    return rest.lstrip(" \t\f\r").startswith(";")


class _Runner:
    """Runs a cell's code objects; those with a top-level ``await`` share one event loop."""

    def __init__(self) -> None:
        self._loop: Any = None

    def run(self, code: CodeType, namespace: Dict[str, Any]) -> Any:
        result = eval(code, namespace)
        if not code.co_flags & _CO_COROUTINE:
            return result
        if self._loop is None:
            import asyncio

            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        return self._loop.run_until_complete(result)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()


def is_event_loop_file(filename: str) -> bool:
    """A file of asyncio, whose loop runs a cell that awaits at top level."""
    return filename.startswith(_ASYNCIO_DIR)


# -- %time, %timeit ----------------------------------------------------------------------------


def _format_time(seconds: float) -> str:
    """As IPython's %time prints a duration: 3 significant digits in s, ms, µs or ns."""
    if seconds >= 60:
        minutes, rest = divmod(seconds, 60)
        return "%dmin %.3gs" % (minutes, rest)
    units = (("s", 1), ("ms", 1e3), ("\u00b5s", 1e6), ("ns", 1e9))
    for unit, scale in units:
        if seconds * scale >= 1:
            return "%.3g %s" % (seconds * scale, unit)
    return "%.3g ns" % (seconds * 1e9)


def _cpu_seconds() -> Tuple[float, float]:
    """User and system CPU time of the job's process so far (as IPython's %time: getrusage)."""
    import resource  # here, not at the top: a cold container's start does without it

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


class _Clock:
    """CPU (user, sys) and wall time since it was made."""

    def __init__(self) -> None:
        self._cpu = _cpu_seconds()
        self._wall = time.perf_counter()

    def report(self) -> str:
        (user, system), wall = _cpu_seconds(), time.perf_counter() - self._wall
        user, system = user - self._cpu[0], system - self._cpu[1]
        return "CPU times: user %s, sys: %s, total: %s\nWall time: %s" % (
            _format_time(user), _format_time(system), _format_time(user + system), _format_time(wall))


def _time(statement: str, frame: FrameType) -> Any:
    """``%time statement``: run it where the magic stands, print how long it took; an expression's
    value is returned (and so shown when it ends the cell)."""
    try:
        code, evaluate = compile(statement, "<timed eval>", "eval"), True
    except SyntaxError:
        code, evaluate = compile(statement, "<timed exec>", "exec"), False
    clock = _Clock()
    value = eval(code, frame.f_globals, frame.f_locals) if evaluate else exec(code, frame.f_globals, frame.f_locals)
    print(clock.report())
    return value


class TimeitResult:
    """What ``%timeit -o`` returns: seconds per loop of each run (as IPython's TimeitResult)."""

    def __init__(self, loops: int, repeat: int, all_runs: List[float]) -> None:
        self.loops = loops
        self.repeat = repeat
        self.all_runs = all_runs  # seconds for ``loops`` loops, per run
        self.timings = [run / loops for run in all_runs]
        self.best = min(self.timings)
        self.worst = max(self.timings)
        self.average = sum(self.timings) / len(self.timings)
        self.stdev = (sum((t - self.average) ** 2 for t in self.timings) / len(self.timings)) ** 0.5

    def __str__(self) -> str:
        runs = "%d run%s" % (self.repeat, "" if self.repeat == 1 else "s")
        loops = "{:,} loop{}".format(self.loops, "" if self.loops == 1 else "s")
        if self.repeat == 1:
            return "%s per loop (mean of %s, %s each)" % (_format_time(self.average), runs, loops)
        return "%s \u00b1 %s per loop (mean \u00b1 std. dev. of %s, %s each)" % (
            _format_time(self.average), _format_time(self.stdev), runs, loops)

    def __repr__(self) -> str:
        return "<TimeitResult : %s>" % self


def timeit_options(line: str) -> Tuple[Dict[str, str], str]:
    """``-n 100 -r 3 -q -o stmt`` -> ({"n": "100", "r": "3", "q": "", "o": ""}, "stmt")."""
    options: Dict[str, str] = {}
    rest = line.strip()
    while rest.startswith("-"):
        flag, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, value = flag[1:2], flag[2:]
        if name in ("n", "r"):
            if not value:
                value, _, rest = rest.partition(" ")
                rest = rest.lstrip()
            if not value.isdigit():
                raise ValueError("%%timeit %s takes a number, not %r" % (flag[:2], value))
            options[name] = value
        elif flag[1:] and set(flag[1:]) <= {"q", "o"}:
            options.update(dict.fromkeys(flag[1:], ""))
        else:
            raise ValueError("%%timeit option %r is not supported in a %%%%celery_docker cell; it takes -n N "
                             "(loops), -r R (runs), -q (quiet) and -o (return the result)" % flag)
    return options, rest


def _timeit(line: str, frame: FrameType) -> Optional[TimeitResult]:
    """``%timeit [-n N] [-r R] [-q] [-o] statement``, timed as IPython times it (stdlib timeit)."""
    import timeit

    options, statement = timeit_options(line)
    namespace = frame.f_globals if frame.f_locals is frame.f_globals else {**frame.f_globals, **frame.f_locals}
    timer = timeit.Timer(statement, globals=namespace)
    loops = int(options.get("n", 0))
    if not loops:
        for exponent in range(10):
            loops = 10 ** exponent
            if timer.timeit(loops) >= _TIMEIT_MIN_SECONDS:
                break
    repeat = int(options.get("r", _TIMEIT_REPEAT))
    result = TimeitResult(loops, repeat, timer.repeat(repeat, loops))
    if "q" not in options:
        print(result)
    return result if "o" in options else None


# -- get_ipython() -----------------------------------------------------------------------------

_CONVERSIONS = {None: str, "s": str, "r": repr, "a": ascii}  # {value!r}
# IPython's $name in a shell command: not inside single quotes; $$ is a literal $
_DOLLAR_NAME = re.compile(r"(.*?)\$(\$?[\w\.]+)(?=([^']*'[^']*')*[^']*$)")


def command_parts(command: str) -> Iterator[Tuple[str, Optional[str], Optional[str]]]:
    """A shell command as IPython reads it (its DollarFormatter): (literal text, Python expression
    to put after it or None, conversion) for each ``{expression}`` and ``$name``. Raises ValueError
    for unbalanced braces."""
    import string  # here, not at the top: a cold container's start does without it

    for literal, field, spec, conversion in string.Formatter().parse(command):
        start = 0
        for match in _DOLLAR_NAME.finditer(literal):
            before, name = match.group(1, 2)
            if name.startswith("$"):
                yield before + name, None, None
            else:
                yield before, name, None
            start = match.end()
        # a format spec is part of the expression: {a[1:3]} is a slice
        yield literal[start:], (field + ":" + spec if spec else field) if field is not None else None, conversion


def _expand(command: str, frame: FrameType) -> str:
    """The command with its ``{expression}`` and ``$name`` expanded where it stands, as IPython
    does; a command that does not expand (``awk '{print $1}'``, ``$HOME``) runs as written."""
    namespace = {**frame.f_globals, **frame.f_locals}
    parts = []
    try:
        for literal, expression, conversion in command_parts(command):
            parts.append(literal)
            if expression is not None:
                parts.append(_CONVERSIONS[conversion](eval(expression, namespace)))
    except Exception:
        return command
    return "".join(parts)


class ShellStandIn:
    """``get_ipython()`` in a cell: ``!cmd`` and ``x = !cmd`` run in the container's shell,
    ``%time``/``%timeit`` run here. Everything else of IPython is absent from the container."""

    def system(self, command: str) -> None:
        """``!command``: its output goes to the cell's output as it comes; the exit status is ``_exit_code``."""
        import subprocess

        frame = sys._getframe(1)
        sys.stdout.flush()
        sys.stderr.flush()
        frame.f_globals["_exit_code"] = subprocess.call(_expand(command, frame), shell=True)

    def getoutput(self, command: str, split: bool = True) -> Any:
        """``x = !command``: its output (stdout and stderr), as a list of lines (``split=False``: one string)."""
        import subprocess

        output = subprocess.run(_expand(command, sys._getframe(1)), shell=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT).stdout.decode("utf-8", "replace")
        return output.splitlines() if split else output

    def run_line_magic(self, magic_name: str, line: str, _stack_depth: int = 1) -> Any:
        frame = sys._getframe(_stack_depth)
        if magic_name == "time":
            return _time(line, frame)
        if magic_name == "timeit":
            return _timeit(line, frame)
        raise NotImplementedError("%%%s would run inside the container, where IPython is not loaded; a "
                                  "%%%%celery_docker cell has !commands, %%time, %%timeit and %%%%time only"
                                  % magic_name)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError("get_ipython().%s: a %%%%celery_docker cell runs in the container, where IPython "
                             "is not loaded; its get_ipython() has system, getoutput and the %%time and %%timeit "
                             "magics only" % name)


_shell = ShellStandIn()


def get_ipython() -> ShellStandIn:
    return _shell


BUILTINS: Dict[str, Any] = {"display": rich_output.display, "get_ipython": get_ipython}
"""Names every cell has, unless the kernel sends a variable of that name."""

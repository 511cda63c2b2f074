"""IPython syntax in a cell -> the Python the container runs.

A cell is transformed with IPython's own input transformers, as IPython transforms a cell before
it runs it, with every line kept where it was (tracebacks name the notebook's line numbers).
The container can run ``!cmd`` and ``x = !cmd`` (in its shell), ``%time``, ``%timeit`` and a
first line ``%%time`` (celery_nb_runtime.cell); every other magic needs IPython, which the
container does not load, so it is refused here, before anything is submitted.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass

from IPython.core.inputtransformer2 import TransformerManager, classic_prompt, ipython_prompt, leading_indent

from celery_nb.analysis import parse_cell
from celery_nb.errors import UnsupportedMagicError
from celery_nb_runtime.cell import command_parts, timeit_options

_SHELL_CALLS = ("system", "getoutput")
_LINE_MAGICS = ("time", "timeit")  # the line magics the container's get_ipython() runs


@dataclass(frozen=True)
class PythonCell:
    source: str
    """What the container runs: Python, with ``get_ipython()`` calls for ``!cmd`` and ``%time``."""
    analysed: str
    """``source`` as analysis.py reads it for inputs and outputs: a ``%time``/``%timeit`` call
    replaced by its statement, a shell call given the expressions its command expands."""
    timed: bool
    """The cell began with ``%%time``."""


class _LineKeepingTransformer(TransformerManager):
    """IPython's transformers, minus the ones that would move lines: leading blank lines stay, a
    first line ``%%time`` is handled by ``to_python``, and where a command continued over lines
    (``!ls \\``) becomes one line, blank lines take the place of the others."""

    def __init__(self) -> None:
        super().__init__()
        self.cleanup_transforms = [leading_indent, classic_prompt, ipython_prompt]
        self.line_transforms = []

    def do_one_token_transform(self, lines: list[str]) -> tuple[bool, list[str]]:
        changed, transformed = super().do_one_token_transform(lines)
        lost = len(lines) - len(transformed)
        if lost:
            joined = next(i for i, (old, new) in enumerate(zip(lines, transformed)) if old != new)
            transformed[joined + 1:joined + 1] = ["\n"] * lost
        return changed, transformed


_transformer = _LineKeepingTransformer()


def _refuse(what: str, line: int) -> UnsupportedMagicError:
    return UnsupportedMagicError(
        f"line {line}: {what} would run inside the container, where IPython is not loaded, so the cell was not "
        f"submitted. A %%celery_docker cell can use !commands, %time, %timeit and %%time (as its first line); "
        f"run {what} in a cell without %%celery_docker.")


def _ipython_method(call: ast.Call) -> str | None:
    """``name`` for a call ``get_ipython().name(...)``."""
    if (isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Call)
            and isinstance(call.func.value.func, ast.Name) and call.func.value.func.id == "get_ipython"):
        return call.func.attr
    return None


def _string_args(node: ast.Call) -> list[str]:
    return [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]


def _analysed_call(node: ast.Call, method: str, line: int, whole_statement: bool) -> str | None:
    """What analysis reads in place of this ``get_ipython()`` call (None: the call as it is); raises
    UnsupportedMagicError for what the container's get_ipython() cannot run."""
    args = _string_args(node)
    if method in _SHELL_CALLS:
        try:
            expressions = [e for _text, e, _conv in command_parts(args[0]) if e is not None and _is_expression(e)]
        except (IndexError, ValueError):  # no command string, or unbalanced braces: nothing expands
            return None
        if not expressions:
            return None
        return f"get_ipython().{method}({args[0]!r}, {', '.join(f'({e})' for e in expressions)})"
    if method == "run_line_magic":
        if len(args) != 2:  # not written by IPython's transformers: the container's get_ipython() decides
            return None
        name, line_text = args
        if name not in _LINE_MAGICS:  # a "%time" here is %%time below the first line
            raise _refuse(f"%{name}", line)
        if name == "timeit":
            try:
                line_text = timeit_options(line_text)[1]
            except ValueError as exc:
                raise UnsupportedMagicError(f"line {line}: {exc}") from None
        return line_text if whole_statement else f"({line_text})"
    raise _refuse(f"get_ipython().{method}", line)


def _is_expression(text: str) -> bool:
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return True


@functools.lru_cache(maxsize=256)  # a cell is often run again unchanged
def to_python(source: str, first_line: int = 1) -> PythonCell:
    """The cell's Python; raises UnsupportedMagicError for a magic the container cannot run and
    SyntaxError (with the notebook's line numbers) for what is not Python after the transformation."""
    lines = source.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    timed = first is not None and lines[first].strip() == "%%time"
    if timed:
        lines[first] = "\n"
    elif first is not None and lines[first].startswith("%%"):
        raise _refuse(lines[first].split()[0], first_line + first)
    python = _transformer.transform_cell("".join(lines))
    tree = parse_cell(python, first_line)
    statements = {id(stmt.value) for stmt in ast.walk(tree) if isinstance(stmt, ast.Expr)}
    replacements = []
    for node in ast.walk(tree):
        method = _ipython_method(node) if isinstance(node, ast.Call) else None
        if method is None:
            continue
        analysed = _analysed_call(node, method, node.lineno, id(node) in statements)
        if analysed is not None and node.lineno == node.end_lineno:
            replacements.append((node.lineno - first_line, node.col_offset, node.end_col_offset, analysed))
    return PythonCell(python, _replace(python, replacements), timed)


def _replace(source: str, replacements: list[tuple[int, int, int, str]]) -> str:
    """``source`` with (line index, start, end byte offset, text) replaced, one line each."""
    lines = source.split("\n")  # as the parser counts lines (str.splitlines also splits at form feeds)
    for index, start, end, text in sorted(replacements, reverse=True):
        encoded = lines[index].encode("utf-8")
        lines[index] = (encoded[:start] + text.encode("utf-8") + encoded[end:]).decode("utf-8")
    return "\n".join(lines)

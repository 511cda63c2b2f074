"""IPython syntax in a cell -> the Python the container runs (IPython's own input transformers),
with every line where it was, and the names that %time statements and !command expansions use."""
import re

import pytest

from celery_nb.analysis import analyse_cell
from celery_nb.cell_syntax import to_python
from celery_nb.errors import UnsupportedMagicError


def test_lines_stay_where_they_were() -> None:
    cell = to_python("\n!ls /a \\\n   /b\nfiles = !ls\n  \nx = 1\n", first_line=2)
    assert cell.source.splitlines() == ["", "get_ipython().system('ls /a     /b')", "",
                                        "files = get_ipython().getoutput('ls')", "", "x = 1"]
    assert not cell.timed


def test_percent_percent_time_is_the_first_line() -> None:
    cell = to_python("\n%%time\nx = 1\nx\n")
    assert cell.timed and cell.source == "\n\nx = 1\nx\n"


def test_time_statements_and_command_expansions_are_analysed() -> None:
    cell = to_python("%time model = fit(data)\n%timeit -n 3 score(model)\n!echo {label.upper()} $path {{x}}\n")
    assert cell.analysed == ("model = fit(data)\nscore(model)\n"
                             "get_ipython().system('echo {label.upper()} $path {{x}}', (label.upper()), (path))\n")
    names = analyse_cell(cell.analysed)
    assert names.reads == {"fit", "data", "score", "label", "path", "get_ipython"} and names.assigns == ("model",)


@pytest.mark.parametrize("source, refused, line", [
    ("x = 1\n%pip install requests\n", "%pip", 4),
    ("%%capture\nx = 1\n", "%%capture", 3),
    ("x = 1\n%%time\n", "%%time", 4),  # only as the first line
    ("obj?\n", "%pinfo", 3),
    ("y = %who_ls\n", "%who_ls", 3),
    ("get_ipython().run_cell('x')\n", "get_ipython().run_cell", 3),
    ("%timeit -p 3 f()\n", "%timeit option '-p'", 3),
])
def test_magics_the_container_cannot_run_are_refused(source: str, refused: str, line: int) -> None:
    with pytest.raises(UnsupportedMagicError, match=f"^line {line}: {re.escape(refused)}"):
        to_python(source, first_line=3)


def test_a_syntax_error_names_the_notebook_line() -> None:
    with pytest.raises(SyntaxError) as info:
        to_python("!ls\nx = (\n", first_line=2)
    assert info.value.lineno == 3

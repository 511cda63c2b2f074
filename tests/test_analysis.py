"""Which names a cell reads from the kernel and assigns (AST + symtable, no regex)."""
import pytest

from celery_nb.analysis import analyse_cell, select_inputs


def test_issue_example_reads_x_and_assigns_y() -> None:
    names = analyse_cell(
        "import sys, time\n"
        "from celery_nb_runtime import progress\n"
        "for i in progress(range(5), desc='work'): time.sleep(0.2)\n"
        "print('hello from', sys.version)\n"
        "y = x * 2\n")
    assert select_inputs(names, {"x", "sys", "unrelated"}) == ["x"]  # the kernel's sys is not shipped
    assert names.assigns == ("i", "y")  # imports are not brought back


@pytest.mark.parametrize("source, kernel, expected", [
    ("x = 1\nprint(x)", {"x"}, []),                        # assigned before read: not an input
    ("x = x + 1", {"x"}, ["x"]),                           # read before assigned
    ("x += 1", {"x"}, ["x"]),
    ("if flag:\n    k = 1\nprint(k)", {"flag", "k"}, ["flag", "k"]),  # conditional binding
    ("r = [v * w for v in range(3)]", {"v", "w"}, ["w"]),  # comprehension variable is local
    ("def f(a):\n    return a + z\nres = f(1)", {"a", "z"}, ["z"]),  # global read in a function
    ("lam = lambda q: q + off", {"q", "off"}, ["off"]),
    ("_hidden + visible", {"_hidden", "visible"}, ["visible"]),
])
def test_inputs(source: str, kernel: set, expected: list) -> None:
    assert select_inputs(analyse_cell(source), kernel) == expected


def test_ipython_hidden_names_are_not_inputs() -> None:
    assert select_inputs(analyse_cell("print(In, x)"), {"In", "x"}, hidden={"In"}) == ["x"]


@pytest.mark.parametrize("source, expected", [
    ("a = 1\nb, (c, d) = 1, (2, 3)", ("a", "b", "c", "d")),
    ("def f(): pass\nclass K: pass", ("f", "K")),
    ("with open('f') as fh:\n    data = fh.read()", ("fh", "data")),
    ("import numpy as np\narr = np.zeros(3)", ("arr",)),
    ("for _ in range(3): total = 1", ("total",)),
    ("if (n := 10) > 5: pass", ("n",)),
    ("try:\n    pass\nexcept Exception as err:\n    msg = str(err)", ("err", "msg")),
])
def test_outputs(source: str, expected: tuple) -> None:
    assert analyse_cell(source).assigns == expected


def test_syntax_error_carries_the_notebook_line_number() -> None:
    with pytest.raises(SyntaxError) as info:
        analyse_cell("a = 1\nb = (\n", first_line=2)
    assert info.value.lineno == 3


def test_globals_a_function_assigns_are_outputs() -> None:
    names = analyse_cell("def setup():\n    global model, count\n    import json\n    model = json\n    count += 1\n"
                         "    local = 2\n\nsetup()\nready = True\n")
    assert names.assigns == ("setup", "ready", "model", "count")  # not the function's own names
    assert names.reads == {"count"}  # read before the function assigns it

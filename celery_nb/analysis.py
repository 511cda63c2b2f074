"""Which names a cell reads from the kernel and which names it assigns, from its AST.

Scoping comes from ``symtable`` (so comprehension variables, function locals and
parameters are not mistaken for kernel variables); statement order from the AST (so
``x = 1; print(x)`` does not ship the kernel's ``x``).
"""
from __future__ import annotations

import ast
import dis
import functools
import symtable
import types
from dataclasses import dataclass
from typing import Callable, Collection, Iterator

from celery_nb_runtime.protocol import CELL_FILENAME


@dataclass(frozen=True)
class CellNames:
    reads: frozenset[str]
    """Names the cell may read before assigning them: candidates for inputs."""
    assigns: tuple[str, ...]
    """Names the cell binds at top level, in first-binding order, imports excluded; then the names
    its functions declare ``global`` and assign."""


def parse_cell(source: str, first_line: int = 1) -> ast.Module:
    """Parse with line numbers as the notebook shows them; raises SyntaxError."""
    return ast.parse("\n" * (first_line - 1) + source, CELL_FILENAME)


@functools.lru_cache(maxsize=256)  # a cell is often run again unchanged: parse it once
def analyse_cell(source: str, first_line: int = 1) -> CellNames:
    tree = parse_cell(source, first_line)
    table = symtable.symtable("\n" * (first_line - 1) + source, CELL_FILENAME, "exec")

    referenced = {s.get_name() for s in table.get_symbols() if s.is_referenced()}
    referenced |= set(_nested_symbols(table, lambda sym: sym.is_referenced() and sym.is_global()))
    # symtable does not count the read in ``x += 1``
    referenced |= {n.target.id for n in ast.walk(tree) if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name)}

    imported_only = {s.get_name() for s in table.get_symbols() if s.is_imported() and not s.is_assigned()}
    bound_in_order = [name for name in _top_level_bindings(tree) if name not in imported_only]
    # ``global name`` then ``name = ...`` in a function: its call makes a variable of the cell
    bound_in_order += _nested_symbols(table, lambda sym: sym.is_declared_global() and sym.is_assigned())
    assigns = tuple(dict.fromkeys(n for n in bound_in_order if n != "_"))

    # A name is read from the kernel unless a top-level statement binds it
    # unconditionally before the first statement that reads it.
    reads = set()
    for name in referenced:
        first_read = _first_statement_using(tree, name)
        first_bind = _first_unconditional_binding(tree, name)
        if first_bind is None or first_read is None or first_read <= first_bind:
            reads.add(name)
    return CellNames(reads=frozenset(reads), assigns=assigns)


@functools.lru_cache(maxsize=256)
def imported_modules(source: str, first_line: int = 1) -> frozenset[str]:
    """The top-level modules a cell imports (absolute imports, also inside its functions):
    ``import a.b`` and ``from a.b import c`` import ``a``."""
    return modules_imported_by(parse_cell(source, first_line))


def modules_imported_by(tree: ast.AST) -> frozenset[str]:
    """The top-level modules the absolute imports anywhere in ``tree`` import."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return frozenset(names)


def code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code of the functions, lambdas and comprehensions defined in it."""
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from code_objects(constant)


@functools.lru_cache(maxsize=256)  # a function submitted again and again is disassembled once
def modules_imported_by_code(code: types.CodeType) -> frozenset[str]:
    """The top-level modules a function's code imports in its body (and in the functions
    defined in it): for one defined in the notebook, cloudpickle sends only its code."""
    return frozenset(str(instruction.argval).partition(".")[0] for nested in code_objects(code)
                     for instruction in dis.get_instructions(nested) if instruction.opname == "IMPORT_NAME")


def select_inputs(names: CellNames, namespace_names: Collection[str], hidden: Collection[str] = ()) -> list[str]:
    """The names to ship: read by the cell, present in the kernel, not IPython internals."""
    return sorted(n for n in names.reads
                  if n in namespace_names and n not in hidden and not n.startswith("_"))


def _nested_symbols(table: symtable.SymbolTable, wanted: Callable[[symtable.Symbol], bool]) -> Iterator[str]:
    """The names of the ``wanted`` symbols of the cell's functions and classes, however deep."""
    for child in table.get_children():
        for sym in child.get_symbols():
            if wanted(sym):
                yield sym.get_name()
        yield from _nested_symbols(child, wanted)


def _binding_names(node: ast.AST) -> Iterator[str]:
    """Names bound by one top-level statement (including inside its nested blocks)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield node.name
        return
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        for alias in node.names:
            if alias.name != "*":
                yield (alias.asname or alias.name).split(".")[0]
        return
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Lambda, ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp)):
            continue  # own scope (only walrus escapes; handled below)
        if isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)):
            yield child.id
        elif isinstance(child, ast.NamedExpr):
            yield child.target.id
            yield from _binding_names(child.value)
        elif isinstance(child, ast.stmt) and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                 ast.ClassDef, ast.Import, ast.ImportFrom)):
            yield from _binding_names(child)
        elif isinstance(child, (ast.ExceptHandler,)) and child.name:
            yield child.name
            yield from _binding_names(child)
        elif isinstance(child, ast.MatchAs) and child.name or isinstance(child, ast.MatchStar) and child.name:
            yield child.name  # type: ignore[misc]
        else:
            yield from _binding_names(child)


def _top_level_bindings(tree: ast.Module) -> Iterator[str]:
    for stmt in tree.body:
        yield from _binding_names(stmt)


_UNCONDITIONAL = (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom, ast.FunctionDef,
                  ast.AsyncFunctionDef, ast.ClassDef)


def _first_unconditional_binding(tree: ast.Module, name: str) -> int | None:
    for index, stmt in enumerate(tree.body):
        if isinstance(stmt, ast.AnnAssign) and stmt.value is None:
            continue
        if isinstance(stmt, _UNCONDITIONAL) and name in set(_binding_names(stmt)):
            return index
    return None


def _first_statement_using(tree: ast.Module, name: str) -> int | None:
    for index, stmt in enumerate(tree.body):
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id == name and not isinstance(node.ctx, ast.Store):
                return index
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return index
    return None

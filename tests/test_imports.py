"""Every project module imports on its own, and no two project modules import each other, directly
or through others. A cycle makes the result depend on which module is imported first (half-built
modules, names missing at import time), and functions that import lazily hide cycles until some
code path runs, so the graph below counts imports at any depth, inside functions too."""

import ast
import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ['metrics']      # project packages; tests/ and bench/ are not imported by the code


def module_files():
    """{module name: path} for the .py files at the root and in the project packages."""
    modules = {}
    for folder, prefix in [('', '')] + [(package, package + '.') for package in PACKAGES]:
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith('.py'):
                stem = name[:-3]
                module = prefix.rstrip('.') if stem == '__init__' else prefix + stem
                modules[module] = os.path.join(REPO, folder, name)
    return modules


MODULES = module_files()


@pytest.mark.parametrize('module', sorted(MODULES))
def test_module_imports(module):
    importlib.import_module(module)


def imported_names(tree, module):
    """(absolute module name, line) for every import in the tree, function bodies included."""
    package = module if MODULES[module].endswith('__init__.py') else module.rpartition('.')[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:      # relative: `from . import x` in a package
                anchor = package.split('.') if package else []
                base = '.'.join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:        # `from metrics import ms_ssim` imports a module too
                yield base + '.' + alias.name, node.lineno


def project_modules_in(name):
    """The project modules that importing `name` runs: it and each parent package."""
    parts = name.split('.')
    return [m for m in ('.'.join(parts[:i]) for i in range(1, len(parts) + 1)) if m in MODULES]


def import_graph():
    """{module: {imported project module: first line of the import}}."""
    graph = {}
    for module, path in MODULES.items():
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        edges = graph.setdefault(module, {})
        for name, line in imported_names(tree, module):
            for target in project_modules_in(name):
                # A module importing itself (train.main reaches its own classes as `train` when run
                # as __main__) is not a cycle between modules.
                if target != module:
                    edges[target] = min(line, edges.get(target, line))
    return graph


def find_cycles(graph):
    """One cycle per group of modules that reach each other, each as [a, b, ..., a]."""
    cycles, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        path = cycle_through(graph, start)
        if path:
            cycles.append(path)
            done.update(path)
    return cycles


def cycle_through(graph, start):
    """A shortest import path from `start` back to itself (breadth first), or None."""
    parents, frontier = {}, [start]
    while frontier:
        next_frontier = []
        for module in frontier:
            for target in sorted(graph[module]):
                if target == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if target not in parents:
                    parents[target] = module
                    next_frontier.append(target)
        frontier = next_frontier
    return None


def describe(cycle, graph):
    steps = ['%s (%s:%d)' % (a, os.path.relpath(MODULES[a], REPO), graph[a][b]) for a, b in zip(cycle, cycle[1:])]
    return ' -> '.join(steps + [cycle[-1]])


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, 'import cycles between project modules (module (file:line of its import) -> ...):\n' + \
        '\n'.join(describe(cycle, graph) for cycle in cycles)

"""The package's shape: every module imports on its own, and no two modules import each other
(directly or around a loop), counting imports inside functions too."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "raykd"


def module_names() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the raykd modules it imports anywhere in its source (lazy imports included)."""
    mods = module_names()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                # a submodule importing its own package is how Python imports it, not a loop
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_raykd_modules():
    graph = import_graph()
    assert len(graph) > 40
    assert not cycles(graph), cycles(graph)


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(module_names())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    res = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_no_source_file_is_ignored_by_git():
    """A module the working tree has but git ignores passes every local test and is missing
    from every clone (a `data/` pattern once hid `raykd/data/*.py`)."""
    repo = ROOT.parent
    if not (repo / ".git").exists():
        return                      # an installed copy, not a checkout: nothing to compare
    sources = [str(p.relative_to(repo)) for folder in ("raykd", "tests", "bench", "jobs")
               for p in (repo / folder).rglob("*") if p.suffix in (".py", ".yaml")
               and "__pycache__" not in p.parts and "runs" not in p.parts]
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", *sources],
                             capture_output=True, text=True).stdout.split()
    assert not ignored, f"git ignores these source files: {ignored}"

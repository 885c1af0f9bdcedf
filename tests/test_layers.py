"""The package's import rules (CONTRIBUTING.md, "Layers"), checked on the source of every module.

The checks read each file's syntax tree, so imports inside function bodies count as much as those
at the top, and nothing is imported to run them.
"""

from __future__ import annotations

import ast
import shutil
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Floors, lowest first: a module imports only from its own floor or below.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("synrep", "synrep.errors", "synrep.registry", "synrep.utils", "synrep.layout",
              "synrep.shipped", "synrep.dist", "synrep.checkpoint", "synrep.config",
              "synrep.device", "synrep.schedule", "synrep.testing", "synrep.browser",
              "synrep.names", "synrep.tracking")),
    ("blocks", ("synrep.concepts", "synrep.data", "synrep.models", "synrep.losses",
                "synrep.cluster")),
    ("producers", ("synrep.captions", "synrep.images", "synrep.methods")),
    ("factory", ("synrep.factory",)),
    ("jobs", ("synrep.selection", "synrep.eval", "synrep.train", "synrep.report",
              "synrep.export")),
    ("stages", ("synrep.stages",)),
    ("app", ("synrep.pipeline", "synrep.scaling", "synrep.cli", "synrep.__main__",
             "synrep.validate")),
]

#: Packages that a module of the first group never imports, beyond what the floors say.
NEVER = [
    (("synrep.eval", "synrep.selection"), ("synrep.train",)),
]

#: The only third-party packages a function body may import: optional, heavy dependencies.
LAZY_OK = ("diffusers", "transformers", "tokenizers", "accelerate", "huggingface_hub", "vllm",
           "ray", "selenium", "scipy", "sklearn", "matplotlib", "torch.utils.tensorboard",
           "wandb", "mlflow", "open_clip")

#: The one synrep module imported in a function body: the entry point checks a config's names
#: before the command line (and torch with it) loads, so a typo fails at once.
LAZY_SYNREP = {("synrep.__main__", "synrep.cli")}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def floor_of(module: str) -> int:
    """The floor of a synrep module: the longest matching prefix wins."""
    best, depth = -1, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if _under(module, p) and len(p) > depth:
                best, depth = i, len(p)
    if best < 0:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS and CONTRIBUTING.md")
    return best


class Import:
    def __init__(self, target: str, names: list[str], line: int, in_body: bool) -> None:
        self.target, self.names, self.line, self.in_body = target, names, line, in_body


def imports_of(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import statement of ``source``, absolute names resolved."""
    tree = ast.parse(source)
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(alias.name, [], node.lineno, id(node) in in_function))
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            out.append(Import(target, [a.name for a in node.names], node.lineno,
                              id(node) in in_function))
    return out


def _resolve(target: str, names: list[str], modules: set[str]) -> list[str]:
    """The synrep modules an import statement loads (``from pkg import mod`` loads ``pkg.mod``)."""
    found = []
    if target in modules:
        found.append(target)
    for n in names:
        if f"{target}.{n}" in modules:
            found.append(f"{target}.{n}")
    if not found:
        t = target
        while t and t not in modules:
            t = t.rpartition(".")[0]
        if t:
            found.append(t)
    return found


def scan(root: Path, package: str = "synrep") -> dict[str, tuple[Path, list[Import], bool]]:
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        name = _module_name(path, root)
        files[name] = (path, imports_of(path.read_text(), name, path.name == "__init__.py"),
                       path.name == "__init__.py")
    return files


def violations(root: Path, extra_dirs: tuple[str, ...] = ("benchmarks",)) -> list[str]:
    """Every broken rule in ``root``'s synrep package (and private-name imports in
    ``extra_dirs``), as one readable line each."""
    files = scan(root)
    modules = set(files)
    errors: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, (path, imps, _) in files.items():
        where = path.relative_to(root)
        for imp in imps:
            if not _under(imp.target, "synrep"):
                if imp.in_body and not any(_under(imp.target, ok) for ok in LAZY_OK):
                    errors.append(f"{where}:{imp.line}: function-body import of {imp.target}; "
                                  "import it at the top (only optional heavy dependencies "
                                  f"may be imported lazily: {', '.join(LAZY_OK)})")
                continue
            if imp.in_body and (mod, imp.target) not in LAZY_SYNREP:
                errors.append(f"{where}:{imp.line}: function-body import of {imp.target}; "
                              "synrep modules are imported at the top")
            for dep in _resolve(imp.target, imp.names, modules):
                if dep == mod or dep == "synrep":
                    continue
                graph[mod].add(dep)
                if floor_of(dep) > floor_of(mod):
                    errors.append(
                        f"{where}:{imp.line}: {mod} ({FLOORS[floor_of(mod)][0]}) imports {dep} "
                        f"({FLOORS[floor_of(dep)][0]}), a floor above it")
                for lows, highs in NEVER:
                    if any(_under(mod, low) for low in lows) and \
                            any(_under(dep, high) for high in highs):
                        errors.append(f"{where}:{imp.line}: {mod} imports {dep}, which it "
                                      "never may")
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private and not _under(mod, imp.target):
                errors.append(f"{where}:{imp.line}: imports private name(s) {private} of "
                              f"{imp.target}; make them public or keep them in their module")
    errors += [f"import cycle among {len(c)} modules: {', '.join(c)}" for c in cycles(graph)]
    for d in extra_dirs:
        for path in sorted((root / d).rglob("*.py")):
            for imp in imports_of(path.read_text(), path.stem, False):
                private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
                if _under(imp.target, "synrep") and private:
                    errors.append(f"{path.relative_to(root)}:{imp.line}: imports private "
                                  f"name(s) {private} of {imp.target}; use the public API")
    return errors


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_keeps_its_layers():
    errors = violations(ROOT)
    assert not errors, "\n".join(errors)


def test_every_module_is_on_a_floor():
    for mod in scan(ROOT):
        floor_of(mod)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the package with ``files`` (path -> source) written over it."""
    shutil.copytree(ROOT / "synrep", tmp_path / "synrep",
                    ignore=shutil.ignore_patterns("__pycache__", "fashion_mini"))
    (tmp_path / "benchmarks").mkdir()
    for rel, src in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    return tmp_path


@pytest.mark.parametrize("rel, source, expect", [
    # a loss that imports a method: a floor above it
    ("synrep/losses/planted.py", "from synrep.methods import METHODS\n", "a floor above it"),
    # evaluation importing the trainer, inside a function body
    ("synrep/eval/planted.py", "def f():\n    from synrep.train.loop import train\n",
     "never may"),
    # a method importing another module's private name
    ("synrep/methods/planted.py", "from synrep.eval.linear import _train_linear_heads\n",
     "private name"),
    # a cycle between two modules of one floor
    ("synrep/data/planted.py", "import synrep.data.planted2\n", "import cycle"),
    # a lazy import of a core dependency
    ("synrep/data/planted3.py", "def f():\n    import numpy\n", "function-body import"),
    # a benchmark reaching into a private name
    ("benchmarks/planted.py", "from synrep.factory import _private\n", "use the public API"),
])
def test_a_planted_violation_is_caught(tmp_path, rel, source, expect):
    files = {rel: source}
    if rel == "synrep/data/planted.py":
        files["synrep/data/planted2.py"] = "import synrep.data.planted\n"
    root = _plant(tmp_path, files)
    errors = violations(root)
    assert any(expect in e for e in errors), errors
    assert all("planted" in e for e in errors), errors  # nothing else in the copy is wrong

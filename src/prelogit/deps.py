"""Which of the package's modules a DVC stage runs: the code part of its ``deps:`` in dvc.yaml.

A stage's code dependencies are the import closure of what its command executes, computed
statically with :mod:`ast`:

- ``python -m prelogit.stage STAGE`` (every notebook stage) runs the stage wrapper
  :mod:`prelogit.stage` and, through papermill, the code cells of ``notebooks/STAGE.ipynb``;
- ``python -m prelogit.X ...`` runs the module ``prelogit.X``;
- ``python path/to/script.py ...`` runs the script (a benchmark, say).

From these entry points every ``import prelogit.x``, ``from prelogit import a, b``,
``from prelogit.x import y``, ``from . import x`` and ``from .x import y`` is followed, at any
depth of the syntax tree (an import inside a function counts: it runs when the function does),
module by module until nothing new turns up. Importing ``prelogit.x`` also executes the package's
``__init__.py``; that file is listed only when it imports something itself or a name is taken from
it (``from prelogit import __version__``): a docstring and a version string cannot change a result.

Not seen: imports built at run time (``importlib.import_module(name)``, ``__import__``). The
package has none (it uses :mod:`importlib` only to look packages up, ``find_spec``); one added
later would need listing by hand, and ``--check`` would call it extra.

    python -m prelogit.deps [STAGE ...]          # each stage's code closure
    python -m prelogit.deps --check [STAGE ...]  # exit 1 naming what dvc.yaml misses or has extra
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: The repository root (src/prelogit/deps.py -> the folder holding dvc.yaml).
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "prelogit"
#: The command every notebook stage runs; its argument names the notebook.
STAGE_MODULE = f"{PACKAGE}.stage"


@dataclass
class Imports:
    """What one source file imports from the package.

    ``modules``: module names whose code runs (``prelogit.io``); ``from_package``: packages a
    plain name was taken from (``from prelogit import __version__``), so their ``__init__.py``
    matters even without imports of its own.
    """

    modules: set[str] = field(default_factory=set)
    from_package: set[str] = field(default_factory=set)


def module_file(name: str, src: Path) -> Path | None:
    """The file of module ``name`` (``a.b`` -> ``src/a/b.py`` or ``src/a/b/__init__.py``), if it exists."""
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_of(code: str, module: str | None, src: Path, package: str = PACKAGE,
               is_package: bool = False, filename: str = "<code>") -> Imports:
    """The package modules that ``code`` imports, wherever the import statement sits.

    ``module`` is the dotted name of the code's own module (``None`` for a notebook or a script,
    which have no package for a relative import to start from); ``is_package`` says it is a
    package's ``__init__.py``, where ``from . import x`` starts at the package itself.
    """
    found = Imports()
    # ast.walk visits every node, so imports inside functions, methods and if-blocks are seen too:
    # such an import runs whenever that code path does, and a stage cannot know it never will.
    for node in ast.walk(ast.parse(code, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _in_package(alias.name, package):
                    found.modules.add(alias.name)
                    if alias.name == package:  # bare `import prelogit`: its attributes are used
                        found.from_package.add(package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:  # a relative import outside a package fails when run; nothing to track
                    continue
                parts = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(parts) - 1:
                    continue  # beyond the top-level package: fails when run, as above
                parts = parts[:len(parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not _in_package(target, package):
                continue
            found.modules.add(target)
            target_file = module_file(target, src)
            for alias in node.names:
                if alias.name != "*" and module_file(f"{target}.{alias.name}", src) is not None:
                    found.modules.add(f"{target}.{alias.name}")  # `from prelogit import io`: a submodule
                elif target_file is not None and target_file.name == "__init__.py":
                    found.from_package.add(target)  # a name (or *) defined in the package's __init__.py
    return found


def notebook_code(path: Path) -> str:
    """The code cells of a notebook as one Python source, IPython magics turned into calls.

    Read as plain JSON (nbformat's schema validation is slow to import and adds nothing here).
    Each cell is parsed separately first so that a syntax error names its cell; cells are joined
    with blank lines (they share one namespace when executed, as here).
    """
    nb = json.loads(Path(path).read_text())
    try:  # IPython's own transform turns `%matplotlib inline` or `!ls` into plain calls
        from IPython.core.inputtransformer2 import TransformerManager

        transform = TransformerManager().transform_cell
    except ImportError:  # without IPython a cell with a magic raises below, which is the honest outcome
        def transform(cell: str) -> str:
            return cell
    cells = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        source = transform(source)
        try:
            ast.parse(source)
        except SyntaxError as err:
            raise SyntaxError(f"{path}: code cell {index}: {err.msg}") from err
        cells.append(source)
    return "\n\n".join(cells)


def _parents(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``: the packages whose ``__init__.py`` importing it executes."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(modules: Iterable[str] = (), files: Iterable[Path] = (), src: Path = ROOT / "src",
            package: str = PACKAGE) -> list[Path]:
    """The package's files that running ``modules`` and the ``files`` (notebooks, scripts) executes.

    Sorted paths. A package ``__init__.py`` is included only when it imports something or a name
    is taken from it (see the module docstring); its imports are followed either way, because it
    runs.
    """
    found = Imports()
    for path in files:
        path = Path(path)
        code = notebook_code(path) if path.suffix == ".ipynb" else path.read_text()
        got = imports_of(code, None, src, package, filename=str(path))
        found.modules |= got.modules
        found.from_package |= got.from_package
    todo = set(modules) | found.modules
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.update(p for p in _parents(name) if p not in seen)
        module = module_file(name, src)
        if module is None:  # `from prelogit.x import y` with no module prelogit.x: fails when run
            continue
        got = imports_of(module.read_text(), name, src, package, is_package=module.name == "__init__.py",
                         filename=str(module))
        found.from_package |= got.from_package
        todo.update(got.modules - seen)
    listed = []
    for name in seen:
        module = module_file(name, src)
        if module is None:
            continue
        if module.name == "__init__.py" and name not in found.from_package and not _has_imports(module):
            continue
        listed.append(module)
    return sorted(listed)


def _has_imports(path: Path) -> bool:
    return any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(path.read_text())))


def load_stages(root: Path = ROOT) -> dict[str, dict]:
    """dvc.yaml's stages."""
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def entry_points(cmd: str, root: Path = ROOT) -> tuple[list[str], list[Path]]:
    """The modules and files a stage command executes: ``(modules, files)``.

    ``python -m prelogit.stage STAGE`` -> the wrapper and ``notebooks/STAGE.ipynb``;
    ``python -m MODULE`` -> that module; ``python SCRIPT.py`` -> the script. Any other form is an
    error rather than an empty closure, so that a new kind of stage gets its deps thought about.
    """
    words = shlex.split(cmd)
    if not words or Path(words[0]).name not in ("python", "python3"):
        raise ValueError(f"cannot tell what {cmd!r} runs: expected `python -m MODULE ...` or `python SCRIPT.py ...`")
    if len(words) >= 3 and words[1] == "-m":
        module = words[2]
        if module == STAGE_MODULE:
            if len(words) < 4:
                raise ValueError(f"{cmd!r} names no stage")
            return [module], [root / "notebooks" / f"{words[3]}.ipynb"]
        return [module], []
    if len(words) >= 2 and words[1].endswith(".py"):
        return [], [root / words[1]]
    raise ValueError(f"cannot tell what {cmd!r} runs: expected `python -m MODULE ...` or `python SCRIPT.py ...`")


def _relative(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def code_deps(stage: str, root: Path = ROOT, stages: dict[str, dict] | None = None) -> list[str]:
    """The package files ``stage`` runs (its command's import closure), as sorted repo-relative paths.

    The notebook or script itself is not in the list (see :func:`entry_files`).
    """
    stages = load_stages(root) if stages is None else stages
    modules, files = entry_points(stages[stage]["cmd"], root)
    return sorted(_relative(p, root) for p in closure(modules, files, root / "src"))


def entry_files(stage: str, root: Path = ROOT, stages: dict[str, dict] | None = None) -> list[str]:
    """The notebook or script a stage's command runs, repo-relative (empty for ``python -m``)."""
    stages = load_stages(root) if stages is None else stages
    return [_relative(p, root) for p in entry_points(stages[stage]["cmd"], root)[1]]


def declared_code(spec: dict) -> set[str]:
    """A stage's deps that are code: everything but the data it reads from results/."""
    return {d for d in spec.get("deps", []) if not d.startswith("results/")}


def check(stages: Iterable[str] | None = None, root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """Per stage, the code dvc.yaml misses and lists extra: ``{stage: {"missing": [...], "extra": [...]}}``.

    Expected: the entry notebook or script plus :func:`code_deps`; declared: every dep outside
    results/. Stages that agree are left out.
    """
    spec = load_stages(root)
    problems = {}
    for stage in stages or spec:
        want = set(entry_files(stage, root, spec)) | set(code_deps(stage, root, spec))
        have = declared_code(spec[stage])
        if want != have:
            problems[stage] = {"missing": sorted(want - have), "extra": sorted(have - want)}
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: print each stage's code closure, or ``--check`` it against dvc.yaml."""
    ap = argparse.ArgumentParser(prog="python -m prelogit.deps", description="The package modules each DVC stage imports (its code deps)")
    ap.add_argument("stages", nargs="*", metavar="STAGE", help="default: every stage in dvc.yaml")
    ap.add_argument("--check", action="store_true",
                    help="exit 1, naming them, if dvc.yaml's deps miss modules or list extra ones")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository (the folder holding dvc.yaml)")
    args = ap.parse_args(argv)
    spec = load_stages(args.root)
    unknown = [s for s in args.stages if s not in spec]
    if unknown:
        ap.error(f"no such stage in {args.root / 'dvc.yaml'}: {', '.join(unknown)}")
    stages = args.stages or list(spec)
    if args.check:
        problems = check(stages, args.root)
        for stage, diff in problems.items():
            for kind in ("missing", "extra"):
                for path in diff[kind]:
                    print(f"{stage}: {kind} {path}")
        if problems:
            print(f"dvc.yaml's deps differ from the import closure in {len(problems)} stage(s); "
                  f"`python -m prelogit.deps STAGE` prints the closure", file=sys.stderr)
            return 1
        print(f"dvc.yaml's code deps match the import closure of {len(stages)} stage(s)")
        return 0
    for stage in stages:
        print(f"{stage}:")
        for path in entry_files(stage, args.root, spec) + code_deps(stage, args.root, spec):
            print(f"  - {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The project's import graph, read from the source (AST; imports inside functions count too).

`python -m tests.importgraph` prints each DVC stage's code closure: the exact list its `deps` must hold;
`python -m tests.importgraph --write` rewrites those lists in dvc.yaml (after the `# code:` comment of each stage).
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "deploy", "finetune")


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> list[str]:
    return sorted(module_name(p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


@lru_cache(maxsize=None)
def imports_of(name: str) -> frozenset[str]:
    """Project modules that module `name` imports (anywhere in the file), resolved to files."""
    path = module_file(name)
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for c in candidates:
            if c.split(".")[0] in PACKAGES and module_file(c) is not None:
                found.add(c)
    return frozenset(found - {name})


@lru_cache(maxsize=None)
def runs_of(name: str) -> frozenset[str]:
    """Project modules that module `name` starts as a process (`[sys.executable, "-m", "<module>", ...]`): code it
    runs without importing it, so a DVC stage depends on it all the same."""
    path = module_file(name)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.List):
            words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for flag, target in zip(words, words[1:]):
                if flag == "-m" and isinstance(target, str) and target.split(".")[0] in PACKAGES and module_file(target):
                    found.add(target)
    return frozenset(found)


def parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(name: str, processes: bool = False) -> set[str]:
    """Every project module that running `name` can execute (its imports, theirs, and package __init__s; with
    `processes`, also the modules it starts as processes, and theirs)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [*imports_of(m), *parents(m), *(runs_of(m) if processes else ())]
    return seen


def files(modules: set[str]) -> set[str]:
    return {module_file(m).relative_to(REPO).as_posix() for m in modules}


def find_cycle() -> list[str] | None:
    """A cycle in the module import graph, if any (package __init__ edges included)."""
    graph = {m: set(imports_of(m)) for m in project_modules()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def stage_modules() -> dict[str, str]:
    """DVC stage name -> the module its command runs (`python -m <module>`)."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        words = stage["cmd"].split()
        module = words[words.index("-m") + 1]
        out[name] = module if module_file(module) and not module_file(module).name == "__init__.py" \
            else f"{module}.__main__"
    return out


def stage_code(module: str) -> set[str]:
    """The files a DVC stage running `module` depends on: what it imports, what it starts as a process (the promote
    stage's infra check runs `python -m deploy.server`), and the files it reads as code (the model card template)."""
    code = files(closure(module, processes=True))
    return code | ({"tasks/export/model_card.md.j2"} if "tasks/export/card.py" in code else set())


def rewrite_dvc_yaml() -> None:
    import re

    lines, out, stage, i = (REPO / "dvc.yaml").read_text().splitlines(), [], None, 0
    modules = stage_modules()
    while i < len(lines):
        line = lines[i]
        if (m := re.match(r"^  (\w+):$", line)) and m.group(1) in modules:
            stage = m.group(1)
        out.append(line)
        i += 1
        if stage and line.strip().startswith("# code: exactly"):
            while i < len(lines) and re.match(r"^      - (tasks|flows|deploy|finetune)/", lines[i]):
                i += 1
            out += [f"      - {f}" for f in sorted(stage_code(modules[stage]))]
    (REPO / "dvc.yaml").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    if "--write" in sys.argv:
        rewrite_dvc_yaml()
    for stage, module in stage_modules().items():
        print(f"{stage}:")
        for f in sorted(stage_code(module)):
            print(f"  - {f}")
    sys.exit(0)

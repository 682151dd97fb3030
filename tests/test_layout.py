"""Layout rules: no import circles between diffrl's modules (a function-level import counts too), no module
much over 600 lines."""

import ast
from pathlib import Path

PACKAGES = [Path(__file__).resolve().parents[1] / name for name in ("diffrl", "rewards")]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            parts = path.relative_to(package.parent).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules ``path`` imports anywhere except under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
               and getattr(stmt.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from diffrl.trainers import run_loop` names a module
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def test_no_import_circles():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    # A package's __init__ is imported before its modules, so an edge into a parent package is not a circle
    # unless that __init__ imports back.
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_module_much_over_600_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 620}
    assert not long, f"split these modules by concern: {long}"


def _edges() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_dependencies_point_down():
    """rewards/ needs only diffrl's small shared pieces; models/ and samplers/ know nothing of rewards, trainers
    or the engine; config knows no trainer; the engine knows no algorithm."""
    shared = {"diffrl.errors", "diffrl.hub", "diffrl.media", "diffrl.secrets"}
    upward = []
    for name, targets in _edges().items():
        for target in targets:
            if _under(name, "rewards") and _under(target, "diffrl") and target not in shared:
                upward.append((name, target))
            if (_under(name, "diffrl.models") or _under(name, "diffrl.samplers")) and any(
                    _under(target, p) for p in ("rewards", "diffrl.trainers", "diffrl.training")):
                upward.append((name, target))
            if name == "diffrl.config" and (_under(target, "diffrl.trainers") or _under(target, "diffrl.training")):
                upward.append((name, target))
            if _under(name, "diffrl.training") and _under(target, "diffrl.trainers"):
                upward.append((name, target))
    assert not upward, "imports against the layering: " + ", ".join(f"{a} -> {b}" for a, b in sorted(upward))


def test_trainers_holds_only_algorithms():
    """Every module of diffrl/trainers registers one algorithm (the registry imports them all)."""
    import pkgutil

    import diffrl.trainers as trainers

    modules_here = {m.name for m in pkgutil.iter_modules(trainers.__path__) if not m.name.startswith("_")}
    registered = {entry.trainer_class.__module__.rsplit(".", 1)[1] for entry in trainers.available_trainers().values()}
    assert modules_here == registered, f"not algorithms: {sorted(modules_here - registered)}"


def test_no_model_family_switch_outside_a_family_file():
    """A flow model family's behaviour lives in its own file of diffrl/models/flow/ (and the UNets' in unet.py):
    no comparison of a ``family`` with ==, != or in anywhere else."""
    def is_family(node) -> bool:
        return getattr(node, "id", None) == "family" or getattr(node, "attr", None) == "family"

    root = PACKAGES[0].parent
    found = []
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            name = str(path.relative_to(root))
            if name == "diffrl/models/unet.py" or name.startswith("diffrl/models/flow/"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and any(is_family(n) for n in (node.left, *node.comparators)):
                    found.append(f"{name}:{node.lineno}")
    assert found == [], f"family switches outside a family's file: {found}"

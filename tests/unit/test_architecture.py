"""The shape a newcomer draws from the imports: no cycle, imports flowing one way, each heavy library in
its own room."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "loratune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(loratune modules, third-party top-level packages) that ``path`` imports, lazily or not."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{a.name}" for a in node.names]
                ours |= {n for n in names if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists()
                         or (PACKAGE.parent / n.replace(".", "/")).is_dir()} or {target}
            elif node.module.startswith("loratune"):
                ours.add(node.module)
            else:
                theirs.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                (ours if a.name.startswith("loratune") else theirs).add(a.name if a.name.startswith("loratune")
                                                                       else a.name.split(".")[0])
    return {m for m in ours if m != here}, theirs


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, (set(), set()))[0]):
            if nxt not in GRAPH:
                continue
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_imports_flow_one_way():
    """cli -> api -> study -> executors -> worker -> training/data; nothing below looks up."""
    layers = [["loratune.cli"], ["loratune.api"], ["loratune.study", "loratune.report", "loratune.compare"],
              ["loratune.executors"], ["loratune.worker", "loratune.packed_worker"],
              ["loratune.training", "loratune.pack", "loratune.losses", "loratune.adapters", "loratune.model",
               "loratune.data"]]
    rank = {m: i for i, layer in enumerate(layers) for m in layer}

    def layer_of(module: str) -> int | None:
        for prefix, i in rank.items():
            if module == prefix or module.startswith(prefix + "."):
                return i
        return None

    for module, (ours, _) in GRAPH.items():
        mine = layer_of(module)
        for target in ours:
            theirs = layer_of(target)
            assert mine is None or theirs is None or theirs >= mine, f"{module} imports {target}, a layer above it"


def test_each_heavy_library_stays_in_its_room():
    rooms = {"ax": {"loratune.optimizer", "loratune.optimizer.seam", "loratune.optimizer.snapshot",
                    "loratune.optimizer.analyses", "loratune.optimizer.encoding", "loratune.optimizer.variants"},
             "botorch": {"loratune.optimizer.seam"},
             "transformers": {"loratune.model", "loratune.training", "loratune.pack", "loratune.data", "loratune.integrations",
                              "loratune.demo.tiny_model", "loratune.demo.smollm2"},
             "peft": {"loratune.model", "loratune.training", "loratune.adapters"},
             "mlflow": {"loratune.tracking"},
             "ray": {"loratune.executors.ray", "loratune.preflight"}}
    for module, (_, theirs) in GRAPH.items():
        for library, allowed in rooms.items():
            if library in theirs:
                assert module in allowed, f"{module} imports {library}"


def private_names(path: Path) -> set[str]:
    """``x._name`` attributes read or written in ``path``, except on the module's own objects (self, cls, opt)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in ("self", "cls", "opt"):
                found.add(f"{owner or '...'}.{node.attr}")
    return found - {"os._exit"}  # the standard library's, documented as such


def test_only_the_seam_names_the_private_insides_of_ax_botorch_and_torch():
    """An Ax upgrade that moves one fails tests/unit/test_optimizer.py, naming it, not a user's resumed study."""
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) != "loratune.optimizer.seam":
            assert not private_names(path), f"{module_name(path)} reaches into {private_names(path)}: use optimizer/seam.py"


def test_executors_never_import_the_worker_module():
    """They share a trial's files through trial_dir.py; the worker is a process they start, not a library."""
    for module, (ours, _) in GRAPH.items():
        if module.startswith("loratune.executors"):
            assert "loratune.worker" not in ours, module

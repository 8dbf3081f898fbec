"""The package's layers: its import graph (every import, function-local ones included) has no
cycle, and the build layer never reaches the loop."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fpt_jax"


def _import_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
               .removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("fpt_jax"):
                for alias in node.names:  # `from fpt_jax import build` names a module
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("fpt_jax")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def _reaches(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_import_graph_of_fpt_jax_is_acyclic():
    graph = _import_graph()
    assert {"fpt_jax.build", "fpt_jax.loop", "fpt_jax.steps", "fpt_jax.runs"} <= set(graph)
    assert _cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_build_layer_never_reaches_the_loop():
    graph = _import_graph()
    for lower in ("fpt_jax.build", "fpt_jax.steps", "fpt_jax.runs", "fpt_jax.checkpoint"):
        assert "fpt_jax.loop" not in _reaches(graph, lower), lower
    assert "fpt_jax.build" in _reaches(graph, "fpt_jax.loop")

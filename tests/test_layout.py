"""Imports run one way: the layers (kronecker.py, lowrank.py) import no project module, model.py
imports the layers (and the small helpers storage.py and runtime.py), scripts import those; no
module imports, directly or through others, a module that imports it back."""
import ast
import glob
import os

from conftest import ROOT

LAYERS = ("kronecker", "lowrank")
# model.py may import the layers, storage (atomic checkpoint writes) and runtime (device, dtype)
MODEL_MAY_IMPORT = {*LAYERS, "storage", "runtime"}


def imported_names(source: str) -> set[str]:
    """Top-level names of every module `source` imports, anywhere (inside functions and
    `if` blocks too); relative imports count as their module name."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                names.add(node.module.split(".")[0])
            elif node.level:                                 # from . import x
                names |= {alias.name.split(".")[0] for alias in node.names}
    return names


def project_graph() -> dict[str, set[str]]:
    """Each top-level module of the repository -> the project modules it imports."""
    paths = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = (imported_names(f.read()) & set(paths)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done, stack = set(), []

    def visit(node):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt)
            if cycle:
                return cycle
        stack.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def has_main_block(source: str) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in ast.parse(source).body)


def test_import_finder_sees_nested_and_relative_imports():
    source = ("import os, numpy.linalg\nfrom model import GPT\n"
              "def f():\n    import sizes\n    if True:\n        from storage import atomic_write\n"
              "class C:\n    from . import runtime\n")
    assert imported_names(source) == {"os", "numpy", "model", "sizes", "storage", "runtime"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_layers_import_no_project_module():
    graph = project_graph()
    for layer in LAYERS:
        assert graph[layer] == set(), f"{layer}.py imports {sorted(graph[layer])}"


def test_model_imports_only_layers_and_helpers():
    imports = project_graph()["model"]
    assert imports <= MODEL_MAY_IMPORT, f"model.py imports {sorted(imports - MODEL_MAY_IMPORT)}"
    assert set(LAYERS) <= imports


def test_no_import_cycles():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_sizes_is_a_library_the_core_does_not_import():
    with open(os.path.join(ROOT, "sizes.py"), encoding="utf-8") as f:
        assert not has_main_block(f.read())              # scripts import it: it must not be a script
    graph = project_graph()
    assert not any("sizes" in graph[m] for m in (*LAYERS, "model"))
    # the layers' commands run sizes.main in a fresh interpreter instead of importing it
    for layer in LAYERS:
        with open(os.path.join(ROOT, f"{layer}.py"), encoding="utf-8") as f:
            source = f.read()
        assert has_main_block(source) and "sizes.main(" in source


def test_no_script_imports_another_script():
    """What two scripts share lives in a small library module (data, runtime, storage, config, sizes)."""
    graph = project_graph()
    scripts = set()
    for name in graph:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            if has_main_block(f.read()) and name not in (*LAYERS, "model"):
                scripts.add(name)
    assert {"train", "study", "eval_ppl", "sample", "export_hf", "prepare_owt", "bench", "compare_init"} <= scripts
    for script in sorted(scripts):
        assert not graph[script] & scripts, f"{script}.py imports the script(s) {sorted(graph[script] & scripts)}"

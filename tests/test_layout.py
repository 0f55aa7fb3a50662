"""Imports run one way: layers <- compression <- scripts. The layers (kron_kernels.py, kronecker.py,
lowrank.py) import no other project module; model.py, the dense GPT, imports none at all; the
compression modules import those two levels (and the small helpers); scripts import what is below
them, never another script; no module imports, directly or through others, one that imports it back."""
import ast
import glob
import os

from conftest import ROOT

# each layer and what of ours it may import
LAYERS = {"kron_kernels": set(), "kronecker": {"kron_kernels"}, "lowrank": set()}
# the modules that apply compression to a built GPT, load and save it, and distil it
COMPRESSION = ("compress", "permute", "calibrate", "checkpoints", "distill", "planning")
HELPERS = {"storage", "runtime"}
# modules with a command line that others import as libraries
LIBRARIES_WITH_A_CLI = {*LAYERS}


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


def module_level_imports(source: str) -> set[str]:
    """The modules `source` imports outside any function or class."""
    tree = ast.parse(source)
    body = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return imported_names(ast.unparse(ast.Module(body=body, type_ignores=[])))


def test_layers_import_only_lower_layers():
    graph = project_graph()
    for layer, allowed in LAYERS.items():
        assert graph[layer] <= allowed, f"{layer}.py imports {sorted(graph[layer] - allowed)}"


def test_model_imports_nothing_of_ours():
    """model.py is the dense GPT: torch only. Its one reference upwards is GPT.from_pretrained, the
    public shortcut for checkpoints.from_pretrained, which imports it when called."""
    with open(os.path.join(ROOT, "model.py"), encoding="utf-8") as f:
        source = f.read()
    paths = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert module_level_imports(source) & paths == set()
    tree = ast.parse(source)
    deferred = {(fn.name, name) for cls in tree.body if isinstance(cls, ast.ClassDef)
                for fn in cls.body if isinstance(fn, ast.FunctionDef)
                for name in imported_names(ast.unparse(fn)) & paths}
    assert deferred == {("from_pretrained", "checkpoints")}
    assert not [fn.name for fn in tree.body if isinstance(fn, ast.FunctionDef)
                if imported_names(ast.unparse(fn)) & paths]


def test_compression_imports_only_layers_model_and_helpers():
    graph = project_graph()
    allowed = {*LAYERS, "model", *COMPRESSION, *HELPERS}
    for name in COMPRESSION:
        assert graph[name] <= allowed, f"{name}.py imports {sorted(graph[name] - allowed)}"


def test_no_import_cycles():
    graph = project_graph()
    graph["model"] = graph["model"] - {"checkpoints"}      # a call-time import, see above
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_sizes_is_a_script_the_core_does_not_import():
    with open(os.path.join(ROOT, "sizes.py"), encoding="utf-8") as f:
        assert has_main_block(f.read())
    graph = project_graph()
    assert not any("sizes" in graph[m] for m in (*LAYERS, "model", *COMPRESSION))
    # the layers' commands run sizes.py in a fresh interpreter instead of importing it
    for layer in ("kronecker", "lowrank"):
        with open(os.path.join(ROOT, f"{layer}.py"), encoding="utf-8") as f:
            source = f.read()
        assert has_main_block(source) and '"sizes.py"' in source


def test_no_script_imports_another_script():
    """What two scripts share lives in a library module (data, runtime, storage, config, checkpoints, ...)."""
    graph = project_graph()
    scripts = set()
    for name in graph:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            if has_main_block(f.read()) and name not in LIBRARIES_WITH_A_CLI:
                scripts.add(name)
    assert {"train", "study", "eval_ppl", "sample", "export_hf", "prepare_owt", "bench", "compare_init", "sizes"} <= scripts
    for script in sorted(scripts):
        assert not graph[script] & scripts, f"{script}.py imports the script(s) {sorted(graph[script] & scripts)}"


def test_no_file_is_a_slab():
    """Each file holds one concern: none is over 600 lines, and model.py stays a nanoGPT-sized read."""
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        assert lines <= (450 if path.endswith("model.py") else 600), f"{os.path.basename(path)}: {lines} lines"


def test_the_map_in_docs_names_every_file():
    """docs/model.md's "where things are" table matches the files."""
    import re
    with open(os.path.join(ROOT, "docs", "model.md"), encoding="utf-8") as f:
        doc = f.read()
    table = doc[doc.index("## Where things are"):doc.index("## GPT")]
    named = set(re.findall(r"`(\w+\.py)`", table))
    files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert named == files, f"missing from the map: {sorted(files - named)}; not a file: {sorted(named - files)}"

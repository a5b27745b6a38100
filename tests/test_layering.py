"""The package's layers, read from the source (every import, module-level and lazy):

contract at the bottom; backends beside each other, importing only the contract and their shared helpers
(backends/registry.py, backends/_common.py); ops above them; then probe / log / optim; then the method
packages; hf/ and the CLI on top. Triton kernels live only in backends/triton/. No import cycles."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "zokernels"
BACKENDS = ("reference", "triton", "cuda", "torch")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


EXTENSIONS = ("zokernels._cuda",)  # compiled modules (absent from a checkout until built)


def _is_module(name: str) -> bool:
    if name in EXTENSIONS:
        return True
    rel = pathlib.Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").exists() or (ROOT.parent / rel / "__init__.py").exists()


def _imports(path: pathlib.Path) -> set[str]:
    """zokernels modules imported anywhere in the file (resolved: `from . import x` names module x when x
    is a module, else the package)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("zokernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("zokernels"):
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            out |= set(subs) if subs and len(subs) == len(node.names) else {mod} | set(subs)
    return {m for m in out if m != here}


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_triton_kernels_only_in_the_triton_backend():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if "triton.jit" in p.read_text() and not _under(_module_name(p), "zokernels.backends.triton")]
    assert offenders == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_import_only_the_contract_their_helpers_and_themselves(backend):
    own = f"zokernels.backends.{backend}"
    allowed = ("zokernels.contract", "zokernels.numerics", "zokernels.backends.registry", "zokernels.backends._common",
               own, "zokernels._cuda")   # numerics: the contract layer's quantized element math
    bad = {m: sorted(i for i in deps if not _under(i, *allowed))
           for m, deps in GRAPH.items() if _under(m, own)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_registry_and_contract_import_nothing_above_them():
    for low in ("zokernels.contract", "zokernels.numerics", "zokernels.backends.registry",
                "zokernels.backends._common"):
        assert {d for d in GRAPH[low] if not _under(d, "zokernels.contract")} == set(), low


def test_ops_import_only_contract_and_backend_helpers():
    for m, deps in GRAPH.items():
        if _under(m, "zokernels.ops"):
            assert {d for d in deps if not _under(d, "zokernels.ops", "zokernels.contract", "zokernels.backends.registry",
                                                  "zokernels.backends._common")} == set(), m


def test_log_and_probe_import_nothing_from_optim_or_above():
    above = ("zokernels.optim", "zokernels.quant", "zokernels.mazo", "zokernels.prune", "zokernels.hf", "zokernels.cli")
    for m in ("zokernels.log", "zokernels.probe"):
        assert {d for d in GRAPH[m] if _under(d, *above)} == set(), m


def test_core_and_optimizers_import_no_method_package():
    """masks, step, probe, log, distributed and optim sit below the method packages (mazo, quant, ...)."""
    core = ("zokernels.masks", "zokernels.step", "zokernels.probe", "zokernels.log", "zokernels.distributed",
            "zokernels.optim")
    above = ("zokernels.mazo", "zokernels.quant", "zokernels.adapters", "zokernels.prune", "zokernels.hf",
             "zokernels.cli")
    bad = {m: sorted(d for d in deps if _under(d, *above)) for m, deps in GRAPH.items() if _under(m, *core)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_nothing_below_hf_imports_transformers():
    for p in ROOT.rglob("*.py"):
        m = _module_name(p)
        if _under(m, "zokernels.hf", "zokernels.cli"):
            continue
        tree = ast.parse(p.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(x.split(".")[0] in ("transformers", "peft") for x in names), m


def test_no_import_cycles():
    """Tarjan's strongly connected components over module -> imported module (package __init__ files
    re-export their modules, so a package's own edges into itself are not cycles of the design)."""
    graph = {m: {d for d in deps if d in GRAPH and not _under(m, d)} for m, deps in GRAPH.items()}
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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
                sccs.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert sccs == []

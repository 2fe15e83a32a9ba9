"""The architecture's rules, checked on the source: no import circles; mt.models imports nothing from
mt.fast, mt.tools or mt.cli; training never imports the Translator; importing mt changes no environment
variable and no torch backend setting; only mt.models branches on `model.arch` comparisons.

Run as a script, it prints the longest chain of module-level imports and the number of circles.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The mt modules `path` imports (module level only, or anywhere including inside functions)."""
    known, tree = modules(), ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes try/if blocks, not function bodies
        nodes = [n for stmt in nodes for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and n.startswith("mt")}
    found.discard(module_name(path))
    return found


def graph() -> dict[str, set[str]]:
    """Module-level import edges; importing a.b also runs a/__init__ (an edge to the parent package)."""
    g = {}
    for name, path in modules().items():
        edges = imports(path, top_level_only=True)
        edges |= {e.rsplit(".", 1)[0] for e in edges if "." in e and e.rsplit(".", 1)[0] != name}
        g[name] = {e for e in edges if not name.startswith(e + ".")}  # a package's own parents load first
    return g


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
            if len(comp) > 1 or v in g.get(v, ()):
                out.append(sorted(comp))
    for v in g:
        if v not in index:
            visit(v)
    return out


def longest_chain(g: dict[str, set[str]]) -> list[str]:
    """The longest path of imports (the graph has no circles)."""
    memo: dict[str, list[str]] = {}

    def chain(v):
        if v not in memo:
            memo[v] = [v] + max((chain(w) for w in g[v]), key=len, default=[])
        return memo[v]
    return max((chain(v) for v in g), key=len)


def test_no_import_circles():
    assert circles(graph()) == []


def test_models_import_nothing_from_fast_tools_or_cli():
    for name, path in modules().items():
        if name.startswith("mt.models"):
            bad = {m for m in imports(path, top_level_only=False) if m.split(".")[1] in ("fast", "tools", "cli")}
            assert not bad, f"{name} imports {bad}"


def test_training_does_not_import_the_translator():
    code = ("import sys, mt.train, mt.validation, mt.scoring, mt.data; "
            "print(sorted(m for m in sys.modules if m in ('mt.translate', 'mt.fast.aot', 'mt.fast.int8', 'mt.ensemble')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr


SETTINGS = """
import os, torch
def settings():
    b = torch.backends
    return (dict(os.environ), torch.get_num_threads(), torch.get_float32_matmul_precision(), b.mkldnn.enabled,
            b.cudnn.enabled, b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cuda.flash_sdp_enabled(),
            b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled(), b.cuda.cudnn_sdp_enabled(),
            torch.are_deterministic_algorithms_enabled())
"""


def test_importing_mt_changes_no_environment_or_backend_setting():
    """The CLI and mt.load switch the speed paths on explicitly; a library user importing mt gets none."""
    code = SETTINGS + f"""
import importlib
before = settings()
for name in {sorted(m for m in modules() if not m.endswith("__main__"))!r}:
    importlib.import_module(name)
after = settings()
print("same" if after == before else [(a, b) for a, b in zip(before, after) if a != b])
"""
    # a bare environment: this process imported mt already, and what an import set here would be
    # inherited by the child, making "set at import" look like "already there"
    bare = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=bare)
    assert out.stdout.strip().splitlines()[-1:] == ["same"], out.stdout[-2000:] + out.stderr[-2000:]


def test_only_build_model_compares_the_architecture_name():
    """Everything else asks the model (reads_prompts, max_source_tokens, ...), not `arch == ...`."""
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(x, ast.Attribute) and x.attr == "arch"
                                                     for x in [node.left, *node.comparators]):
                # build_model; the config's validation of the name; the ensemble's check that runs match
                assert name in ("mt.models", "mt.config", "mt.translate"), f"{name}:{node.lineno} compares model.arch"


if __name__ == "__main__":
    g = graph()
    chain = longest_chain(g) if not circles(g) else []
    print(f"{len(g)} modules, {sum(map(len, g.values()))} module-level imports, {len(circles(g))} circles")
    print(f"longest import chain ({len(chain)} modules): {' -> '.join(chain)}")

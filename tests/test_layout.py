"""The package's folders are its layers: every import, read from the sources, runs downward
(front -> serve / bake / evaluation -> detect -> engine -> core), lazy imports inside functions
included. A new module that breaks the order fails here, not in a reader's head."""
from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "steer_gguf"
CORE_MODULES = {"errors", "fileio", "model", "profile", "trace", "grammar", "hub"}
# what each layer may import besides itself
MAY_IMPORT = {
    "core": {"core"},
    "engine": {"core"},
    "detect": {"core", "engine"},
    "evaluation": {"core", "engine", "detect"},
    "serve": {"core", "engine", "detect"},
    "bake": {"core", "engine", "evaluation"},
    "front": {"core", "engine", "detect", "evaluation", "serve", "bake"},
    "api": {"core", "engine", "detect", "evaluation", "serve", "bake"},  # steer_gguf/__init__.py
}


def layer_of(parts: tuple[str, ...]) -> str:
    """The layer of a module given as its dotted parts under steer_gguf."""
    if not parts or parts == ("__init__",):
        return "api"
    if parts == ("__main__",):
        return "front"
    if parts[0] in MAY_IMPORT and len(parts) > 1:
        return parts[0]
    if parts[0] in CORE_MODULES or parts[0] == "_native":
        return "core" if parts[0] != "_native" else "engine"  # the native bridge is the engine's
    if parts[0] in MAY_IMPORT:  # the subpackage itself (its __init__)
        return parts[0]
    raise AssertionError(f"steer_gguf.{'.'.join(parts)}: a module outside every layer")


def module_parts(path: pathlib.Path) -> tuple[str, ...]:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def imported(path: pathlib.Path) -> list[tuple[int, tuple[str, ...]]]:
    """(line, dotted parts under steer_gguf) of every import of the package from `path`."""
    parts = module_parts(path)
    package = parts if path.name == "__init__.py" else parts[:-1]
    if parts == ("__init__",):
        package = ()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = tuple(node.module.split(".")) if node.module else ()
                if not mod:  # from . import a, b: each name is a module
                    found += [(node.lineno, base + (a.name,)) for a in node.names]
                else:
                    found.append((node.lineno, base + mod))
            elif node.module and node.module.split(".")[0] == "steer_gguf":
                found.append((node.lineno, tuple(node.module.split(".")[1:])))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, tuple(a.name.split(".")[1:])) for a in node.names
                      if a.name.split(".")[0] == "steer_gguf"]
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_the_sources_are_where_the_layout_says():
    assert SOURCES, SRC
    top = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert top == CORE_MODULES, f"top-level modules must be the core: extra {top - CORE_MODULES}"
    for sub in MAY_IMPORT.keys() - {"core", "api"}:
        assert (SRC / sub / "__init__.py").is_file(), sub


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_downward(path):
    me = layer_of(module_parts(path))
    for line, target in imported(path):
        if not target:
            continue
        them = layer_of(target)
        assert them == me or them in MAY_IMPORT[me], \
            f"{path.relative_to(SRC)}:{line}: {me} imports steer_gguf.{'.'.join(target)} ({them})"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule itself can fail: a detect module importing the CLI is caught."""
    fake = tmp_path / "steer_gguf"
    (fake / "detect").mkdir(parents=True)
    bad = fake / "detect" / "risk.py"
    bad.write_text("def f():\n    from ..front.plots import usage_plot\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert imported(bad) == [(2, ("front", "plots"))]
    with pytest.raises(AssertionError, match="detect imports steer_gguf.front.plots"):
        test_imports_run_downward(bad)


def test_the_public_api_needs_no_module_path():
    import steer_gguf

    for name in ("SteeredLlama", "Profile", "ExpertRule", "BiasRule", "ModelRef", "model_info", "RoutingTrace",
                 "SteerError", "evaluate", "tune", "audit", "Sampling", "EvalReport", "load_eval_set", "behavior",
                 "BatchEngine", "Request", "SamplerSpec", "GenJob", "generate_batch", "bake_profile"):
        assert name in steer_gguf.__all__, name
        assert getattr(steer_gguf, name) is not None, name
    assert callable(steer_gguf.evaluate) and callable(steer_gguf.tune) and callable(steer_gguf.audit)

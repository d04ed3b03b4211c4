"""The structure, enforced: every import points down the layer table (those inside functions too), there is no
module cycle, no module reaches for another's private name, only the top layers read posttrain.config, no file is
over 400 lines, and the table of methods agrees with the CLI, the configs and the workflow."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, get_args

import pytest

ROOT = Path(__file__).resolve().parent.parent / "posttrain"

# Bottom first. A module may import its own layer or a lower one.
LAYERS = [{"errors", "io", "losses"}, {"data", "config"}, {"models"}, {"engine", "rollout", "runs"},
          {"rewards", "judge", "envs"}, {"methods"}, {"eval", "curate", "report", "plan", "serve", "ui"}, {"recipes"},
          {"workflow", "ship", "demo"}, {"cli", "__main__"}]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
CONFIG_READERS = {"recipes", "runs", "workflow", "ship", "demo", "cli", "config"}
MAX_LINES = 400


def _module(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def posttrain_imports(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, imported posttrain module, imported name or '') for every import in a file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "posttrain":
                yield from ((node.lineno, f"posttrain.{a.name}", "") for a in node.names)
            elif node.module.startswith("posttrain."):
                yield from ((node.lineno, node.module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name, "") for a in node.names if a.name.startswith("posttrain."))


def layer_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        src = _package(_module(path, root))
        if src == "":  # posttrain/__init__.py: the package itself
            continue
        for line, dst_module, name in posttrain_imports(path):
            dst = _package(dst_module)
            where = f"{path.relative_to(root.parent)}:{line}"
            if dst not in RANK or src not in RANK:
                bad.append(f"{where}: {dst_module} or the importing module is not in the layer table")
            elif dst != src and RANK[dst] > RANK[src]:
                bad.append(f"{where}: {src} (layer {RANK[src]}) imports {dst_module} (layer {RANK[dst]})")
            if dst == "config" and src not in CONFIG_READERS:
                bad.append(f"{where}: {src} reads posttrain.config; only {sorted(CONFIG_READERS)} may")
            if name.startswith("_") and dst_module != _module(path, root):
                bad.append(f"{where}: imports the private name {name} from {dst_module}")
    return bad


def module_cycles(root: Path = ROOT) -> list[list[str]]:
    """Strongly connected components (more than one module) of the module import graph, lazy imports included."""
    modules = {_module(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for _, dst, name in posttrain_imports(path):
            target = f"{dst}.{name}" if f"{dst}.{name}" in modules else dst
            if target in modules and target != m:
                graph[m].add(target)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_arrows_point_down_config_stays_on_top_and_private_names_stay_home():
    bad = layer_violations()
    assert not bad, "\n".join(bad)


def test_there_are_no_module_cycles():
    cycles = module_cycles()
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_an_upward_import_is_caught(tmp_path):
    # The check must be able to fail: a losses module importing the engine (inside a function) is reported.
    pkg = tmp_path / "posttrain"
    (pkg / "losses").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (pkg / "losses" / "bad.py").write_text("def f():\n    from posttrain.engine.loop import train_loop\n")
    (pkg / "engine" / "loop.py").write_text("from posttrain.losses.bad import f\n")
    bad = layer_violations(pkg)
    assert len(bad) == 1 and "losses (layer 0) imports posttrain.engine.loop (layer 3)" in bad[0]
    assert module_cycles(pkg) == [["posttrain.engine.loop", "posttrain.losses.bad"]]


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_package_says_what_it_is_for():
    missing = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
               if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, missing


def test_method_names_agree():
    from posttrain.cli import build_parser
    from posttrain.config import CONFIGS, StageSpec
    from posttrain.recipes import RECIPES

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    stage_kinds = {a for arg in get_args(StageSpec.model_fields["train"].annotation) for a in get_args(arg)}
    assert set(RECIPES) == set(CONFIGS) == stage_kinds
    assert set(RECIPES) <= commands


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "reward", "grpo", "ppo"])
def test_each_recipe_runs_and_says_what_it_does(name):
    import importlib

    from posttrain.recipes import RECIPES

    module = importlib.import_module(RECIPES[name].module)
    assert callable(module.run) and len(module.__doc__.splitlines()) >= 3


def test_settings_defaults_are_declared_once_in_the_config():
    from dataclasses import MISSING, fields

    from posttrain.config import DPOSection, GRPOSection, PPOSection, TrainConfig
    from posttrain.engine import LoopOptions
    from posttrain.losses import PreferenceParams
    from posttrain.methods.grpo import GRPOParams
    from posttrain.methods.ppo import PPOParams

    derived = {LoopOptions: {"total_steps", "warmup_steps", "optimizer", "autocast"}}  # computed by the recipe
    for cls, section in [(GRPOParams, GRPOSection), (PPOParams, PPOSection), (PreferenceParams, DPOSection),
                         (LoopOptions, TrainConfig)]:
        for f in fields(cls):
            if f.name in derived.get(cls, set()):
                continue
            assert f.name in section.model_fields, f"{cls.__name__}.{f.name} has no {section.__name__} field"
            assert f.default is MISSING and f.default_factory is MISSING, \
                f"{cls.__name__}.{f.name} declares a default; {section.__name__} is where it lives"

"""dvc.yaml tells the truth: each stage depends on every module it imports and on every path it is given."""
import ast
import re
from pathlib import Path

import pytest
import yaml

from aladin.reproducibility import expanded_stages

ROOT = Path(__file__).resolve().parents[1]
# foreach stages expanded as DVC does (name@item), so every generated stage is checked like the others
DVC = dict(yaml.safe_load((ROOT / "dvc.yaml").read_text()),
           stages=expanded_stages(ROOT / "dvc.yaml", ROOT / "params.yaml"))


def local_imports(path: Path, seen: set) -> set:
    """Files of aladin/ and stages/ that `path` imports, transitively."""
    if path in seen:
        return seen
    seen.add(path)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside aladin/ (or a sub-package of it)
                package = path.parent.relative_to(ROOT).parts
                package = ".".join(package[:len(package) - node.level + 1])
                names = [f"{package}.{node.module}" if node.module else package]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] in ("aladin", "stages"):
                for candidate in (ROOT / (name.replace(".", "/") + ".py"),
                                  ROOT / name.replace(".", "/") / "__init__.py"):
                    if candidate.is_file():
                        local_imports(candidate, seen)
    return seen


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_stage_deps_cover_its_imports(stage):
    spec = DVC["stages"][stage]
    module = re.search(r"python -m stages\.(\w+)", spec["cmd"]).group(1)
    files = local_imports(ROOT / "stages" / f"{module}.py", set())
    recipe = re.search(r"--recipe (\w+)", spec["cmd"])
    if recipe:  # aladin.peers imports the recipe's module by name
        files = local_imports(ROOT / "aladin" / "recipes" / f"{recipe.group(1)}.py", files)
    needed = {str(f.relative_to(ROOT)) for f in files if f.name != "__init__.py"}
    missing = needed - set(spec["deps"])
    assert not missing, f"stage {stage} imports {sorted(missing)} but does not list them as deps"


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_every_path_in_cmd_is_a_dep_or_an_out(stage):
    spec = DVC["stages"][stage]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]
    declared = set(spec["deps"]) | set(outs)
    tokens = spec["cmd"].split()
    # Resume state is scratch owned by the stage (fingerprinted, git-ignored), deliberately not an out.
    scratch = {tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--resume-dir"}
    for path in scratch:
        assert path.startswith("checkpoints/"), f"stage {stage}: resume state {path} must live under checkpoints/"
    paths = [t for t in tokens if "/" in t and not t.startswith("-") and t not in scratch]
    for path in paths:
        assert path in declared, f"stage {stage}: {path} is in cmd but neither a dep nor an out"
    for out in outs:
        # An out is passed itself, or lies inside a folder that is passed (the report's --out reports).
        assert any(out == t or out.startswith(t.rstrip("/") + "/") for t in tokens), \
            f"stage {stage}: out {out} is not passed to the command"


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_params_are_known_sections(stage):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in DVC["stages"][stage].get("params", []):
        node = params
        for part in key.split("."):
            assert part in node, f"stage {stage} tracks unknown param {key}"
            node = node[part]

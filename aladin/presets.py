"""Named params presets: the paper profile and the six released training recipes.

`params.yaml` is the embedded default. A profile (`aladin/presets/paper.yaml`) and a recipe
(`aladin/presets/recipes/<name>.yaml`) are flat files of dotted params keys; applying them means running
`dvc exp run -S key=value ...`, so every real value is visible in `params.yaml`, `dvc.lock` and `dvc exp show`
instead of hiding behind one profile key (DVC_AND_NOTEBOOKS.md 8.3).

The target of a run is the committed `params.yaml` (git HEAD) with the profile, then the recipe, on top; the
`-S` options are the leaves where the workspace's `params.yaml` differs from that target. A workspace left
holding an earlier experiment's params (`dvc exp run` leaves them there) therefore still gets exactly the
target: recipes need not repeat what the profile says.

    python -m aladin.presets --profile paper --recipe alignment-triplet          # print the -S options
    python -m aladin.presets --profile paper --recipe alignment-triplet --run    # dvc exp run -n paper-...
    python -m aladin.presets --profile paper --extra my-site.yaml --run          # plus your own overrides
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import yaml

from .config import ConfigError, params_from_dict

PRESETS_DIR = Path(__file__).parent / "presets"
RECIPES_DIR = PRESETS_DIR / "recipes"
DEFAULT_RECIPE = "matching-distill-finetune"  # what params.yaml itself describes


def profile_names() -> list[str]:
    """`embedded` (params.yaml as committed) and every `presets/*.yaml`."""
    return ["embedded"] + sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_overrides(path: Path) -> dict:
    """A preset file: a flat mapping of dotted params keys to values."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read preset ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"{path}: expected a mapping of dotted params keys to values")
    return raw


def overrides_for(profile: str, recipe: str | None, extra: tuple = ()) -> list[tuple[Path, dict]]:
    """The preset files of a profile, a recipe and any `extra` files (yours: mirrors, local paths, sizes),
    in the order they apply."""
    if profile not in profile_names():
        raise ConfigError(f"unknown profile {profile!r} (known: {', '.join(profile_names())})")
    if recipe is not None and recipe not in recipe_names():
        raise ConfigError(f"unknown recipe {recipe!r} (known: {', '.join(recipe_names())})")
    files = [] if profile == "embedded" else [PRESETS_DIR / f"{profile}.yaml"]
    if recipe is not None:
        files.append(RECIPES_DIR / f"{recipe}.yaml")
    return [(f, read_overrides(f)) for f in files + [Path(e) for e in extra]]


def apply(raw: dict, overrides: dict, source: str) -> dict:
    """A copy of `raw` with each dotted key set. A key absent from `raw` is refused, as `dvc exp run -S` does."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node, parts = out, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{source}: unknown key '{'.'.join(parts[:i + 1])}' (not in params.yaml)")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def leaves(raw, prefix: str = "") -> dict:
    """Dotted key -> value for every non-mapping value (lists are leaves, as `-S` sets them whole)."""
    if not isinstance(raw, dict):
        return {prefix: raw}
    out = {}
    for k, v in raw.items():
        out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def hydra_value(value) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): strings quoted, lists bracketed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise ConfigError(f"cannot express {value!r} as a -S value")


def _same(a, b) -> bool:
    """Equal as params: 1.0e-5 in a preset and the string '1e-05' an earlier -S left behind are the same
    value for the params loader (DVC_AND_NOTEBOOKS.md 3.2)."""
    if isinstance(a, bool) or isinstance(b, bool) or not all(isinstance(x, (int, float, str)) for x in (a, b)) \
            or (isinstance(a, str) and isinstance(b, str)):
        return a == b
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def set_options(current: dict, target: dict) -> list[str]:
    """`-S key=value` options turning the params `current` into `target` (same keys)."""
    now, want = leaves(current), leaves(target)
    options = []
    for key, value in want.items():
        if key not in now:
            raise ConfigError(f"params.yaml has no key '{key}'")
        if not _same(now[key], value):
            options += ["-S", f"{key}={hydra_value(value)}"]
    return options


def committed_params(params_path: Path) -> dict:
    """The committed params.yaml (git HEAD); outside a git checkout, the file itself."""
    try:
        text = subprocess.run(["git", "show", f"HEAD:./{params_path.name}"], cwd=params_path.parent or ".",
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = params_path.read_text()
    return yaml.safe_load(text)


def target_params(baseline: dict, profile: str, recipe: str | None, extra: tuple = ()) -> dict:
    """The baseline with the profile, the recipe and the `extra` files applied, checked by the params loader."""
    target = baseline
    for path, overrides in overrides_for(profile, recipe, extra):
        target = apply(target, overrides, str(path))
    params_from_dict(target, f"{profile} profile" + (f" + recipe {recipe}" if recipe else ""))
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aladin.presets", description=__doc__.splitlines()[0],
                                epilog=f"recipes: {', '.join(recipe_names())}")
    p.add_argument("--profile", default="embedded", help=f"one of {', '.join(profile_names())}")
    p.add_argument("--recipe", default=None, help=f"a released recipe (params.yaml is {DEFAULT_RECIPE})")
    p.add_argument("--extra", action="append", default=[], metavar="FILE",
                   help="a further preset file applied last (e.g. local mirrors or paths); repeatable")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--run", action="store_true", help="run `dvc exp run -n <name> -S ...` instead of printing")
    p.add_argument("--name", default=None, help="experiment name (default: <profile>-<recipe>)")
    p.add_argument("dvc_args", nargs="*", help="further `dvc exp run` options, after --")
    args = p.parse_args(argv)
    try:
        params_path = Path(args.params)
        target = target_params(committed_params(params_path), args.profile, args.recipe, tuple(args.extra))
        options = set_options(yaml.safe_load(params_path.read_text()), target)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.run:
        for flag, value in zip(options[::2], options[1::2]):
            print(flag, value)
        return 0
    name = args.name or f"{args.profile}-{args.recipe or DEFAULT_RECIPE}"
    command = ["dvc", "exp", "run", "-n", name, *options, *args.dvc_args]
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    raise SystemExit(main())

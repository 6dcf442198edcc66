"""A micro dataset for stage tests: params.yaml with per-section overrides, then the data and features stages."""
from __future__ import annotations

from pathlib import Path

import yaml

from stages import data as data_stage
from stages import features as features_stage

ROOT = Path(__file__).resolve().parents[1]


def write_micro_params(path: Path, overrides: dict) -> None:
    """`path` = the params file there with `overrides` merged in: section by section, and a nested mapping
    (a recipe's `peers.<name>`) key by key, so every key of params.yaml stays present."""
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def micro_world(root: Path, overrides: dict) -> Path:
    """Write `root/params.yaml` (the repository's params with `overrides` merged section by section) and run the
    data and features stages into `root/dataset`, `root/backbone`, `root/features`. Returns the params path."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    p = str(path)
    assert data_stage.main(["--params", p, "--out", str(root / "dataset"), "--backbone-out", str(root / "backbone")]) == 0
    assert features_stage.main(["--params", p, "--data", str(root / "dataset"), "--out", str(root / "features")]) == 0
    return path

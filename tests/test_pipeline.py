"""The whole pipeline, end to end, on a micro setting in a temporary copy of the repository.

Runs `dvc repro`, checks every artefact, then `dvc exp run -S distill.temperature=2.0` and checks that
only distillation and what follows re-ran and that `dvc metrics diff` sees the matching head change.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

MICRO = {
    "data": {"n_train": 48, "n_val": 16, "n_test": 24, "image_size": 64},
    "backbone": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64},
    "features": {"min_size": 64, "max_size": 112, "batch_size": 16},
    "model": {"matching_ff": 32},
    "train_alignment": {"epochs": 2, "batch_size": 16},
    "distill": {"epochs": 2, "batch_size": 16},
    "eval": {"fold_size": 8, "latency_queries": 4, "qualitative_queries": 2},
}


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout
    files = [f for f in tracked.split("\0") if f and not f.startswith(("metrics/", "reports/", "eval/"))]
    for f in files + [p for p in ("dvc.yaml", "params.yaml") if p not in files]:
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for section, values in MICRO.items():
        params[section].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "dvc.lock").unlink(missing_ok=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", PYTHONPATH=str(work))
    run(["git", "init", "-q"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "micro"], work, env)
    run(["dvc", "config", "--local", "core.check_update", "false"], work, env)
    run(["dvc", "repro"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline results"], work, env)
    return work, env


def test_repro_writes_every_artefact(project):
    work, _ = project
    for path in ("data/dataset/dataset_coco.json", "data/features/features.tsv", "data/backbone/pytorch_model.bin",
                 "models/alignment/model.safetensors", "models/distill/model.safetensors",
                 "dvclive/train_alignment/metrics.json", "dvclive/train_distill/metrics.json",
                 "metrics/eval.json", "metrics/latency.json", "eval/qualitative.json", "reports/report.html"):
        assert (work / path).is_file(), path
    metrics = json.loads((work / "metrics/eval.json").read_text())
    for head in ("matching", "alignment"):
        five_k = metrics[head]["coco_5k"]
        assert (five_k["n_images"], five_k["n_captions"], five_k["head"]) == (24, 120, head)
        folds = metrics[head]["coco_1k_5fold"]
        assert folds["n_folds"] == 3 and set(folds["folds"]) == {"0", "1", "2"}
        for record in (five_k, folds):
            parts = [record[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
            assert record["rsum"] == pytest.approx(sum(parts))
    latency = json.loads((work / "metrics/latency.json").read_text())
    assert latency["matching"]["t2i"]["median_ms"] > 0 and latency["alignment"]["t2i"]["n_queries"] == 4
    html = (work / "reports/report.html").read_text()
    assert "<img" in html and f"{metrics['matching']['coco_5k']['rsum']:.1f}" in html


def test_temperature_experiment_reruns_only_distillation_onwards(project):
    work, env = project
    out = run(["dvc", "exp", "run", "-S", "distill.temperature=2.0"], work, env)
    for stage in ("data", "features", "train_alignment"):
        assert f"'{stage}' didn't change" in out or f"Stage '{stage}' is cached" in out, out
    for stage in ("train_distill", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], work, env) or "{}")
    changed = [k for f, keys in diff.items() for k, v in keys.items()
               if f in ("metrics/eval.json", "dvclive/train_distill/metrics.json") and v.get("diff")]
    assert any(k.startswith(("matching.", "train.", "val.matching")) for k in changed), diff
    assert not any(k.startswith("alignment.") for k in changed), "the alignment head must not change"
    params = json.loads(run(["dvc", "params", "diff", "--json"], work, env))
    change = params["params.yaml"]["distill.temperature"]
    assert (change["old"], change["new"]) == (6.0, 2.0)

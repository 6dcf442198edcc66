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

from micro import write_micro_params

ROOT = Path(__file__).resolve().parents[1]

MICRO = {
    "data": {"n_train": 48, "n_val": 16, "n_test": 24, "image_size": 64, "single_1k_size": 8},
    "backbone": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64},
    "features": {"min_size": 64, "max_size": 112, "batch_size": 16},
    "model": {"matching_ff": 32},
    "train_alignment": {"epochs": 2, "batch_size": 16},
    "distill": {"epochs": 2, "batch_size": 16},
    "eval": {"fold_size": 8, "latency_queries": 4, "qualitative_queries": 2},
    "benchmark": {"latency_queries": 4, "crossencoder_pairs": 32, "sweep_max": 2000, "sweep_queries": 20,
                  "sweep_timed_queries": 10},
    "peers": {"teran": {"text_layers": 1, "d_img": 16, "d_emb": 16, "ffn": 32, "heads": 2, "epochs": 1, "batch_size": 8},
              "selfalign": {"embed_size": 16, "views": 2, "heads": 2, "prototypes": 8, "context_topk": 8, "epochs": 1,
                            "batch_size": 8}},
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
    write_micro_params(work / "params.yaml", MICRO)
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


def test_results_travel_through_a_dvc_remote(project, tmp_path):
    """README "Sharing results": push to a remote, clone fresh, pull: nothing to re-run, the report is there."""
    work, env = project
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "--local", "-d", "shared", str(remote)], work, env)
    run(["dvc", "push"], work, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    env_clone = dict(env, PYTHONPATH=str(clone))
    run(["dvc", "remote", "add", "--local", "-d", "shared", str(remote)], clone, env_clone)
    run(["dvc", "pull"], clone, env_clone)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env_clone)
    dry = run(["dvc", "repro", "--dry"], clone, env_clone)
    assert "Running stage" not in dry and "Stage 'report' didn't change" in dry, dry
    for path in ("reports/report.html", "models/distill/model.safetensors", "data/features/features.tsv"):
        assert (clone / path).read_bytes() == (work / path).read_bytes(), path


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


def test_queued_temperature_sweep_re_renders_the_report(project):
    """The README's sweep: three queued experiments run by `dvc exp run --run-all`, collected from
    `dvc exp show --json` (aladin.sweep) and drawn by a re-rendered report."""
    work, env = project
    before = (work / "reports/report.html").read_text()
    assert "No sweep collected yet" in before
    run(["dvc", "exp", "run", "--queue", "-S", "distill.temperature=1.0,3.0,4.0"], work, env)
    out = run(["dvc", "exp", "run", "--run-all", "-j", "1"], work, env)
    for stage in ("data", "features", "train_alignment"):  # queued runs reuse stage 1 from the cache
        assert out.count(f"Stage '{stage}' didn't change") + out.count(f"Stage '{stage}' is cached") == 3, out
    run([sys.executable, "-m", "aladin.sweep", "--out", "sweeps/temperature.json"], work, env)
    collected = json.loads((work / "sweeps/temperature.json").read_text())
    values = [p["value"] for p in collected["points"]]
    assert {1.0, 3.0, 4.0, 6.0} <= set(values) and values == sorted(values)
    # Each point's rsum is that experiment's own metrics/eval.json, read here through git.
    for point in collected["points"]:
        stored = json.loads(run(["git", "show", f"{point['rev']}:metrics/eval.json"], work, env))
        assert point["rsum"]["matching"]["coco_5k"] == stored["matching"]["coco_5k"]["rsum"]
    assert len({p["rsum"]["alignment"]["coco_5k"] for p in collected["points"]}) == 1  # stage 1 is shared
    out = run(["dvc", "repro", "report"], work, env)
    assert "Running stage 'report'" in out and "Running stage 'train_distill'" not in out
    html = (work / "reports/report.html").read_text()
    assert "No sweep collected yet" not in html and "Temperature sweep" in html
    assert (work / "reports/figures/temperature_sweep.png").is_file()


def test_paper_profile_end_to_end_on_a_tiny_coco_fixture(project, tmp_path):
    """`make paper`'s path: the paper profile and a released recipe applied by aladin.presets through
    `dvc exp run`, on MS-COCO-format archives and a VinVL-format backbone served on loopback.

    Only sizes are shrunk (the extra preset file below): the data source, the downloads with checksums, the
    VinVL backbone loader, detection-mode feature extraction, the recipe's single training stage with stage 2
    passing through, evaluation and the report are the paper profile's.
    """
    from coco_fixture import checkpoint_files, serve, write_coco_world
    from loopback import serving

    from aladin.backbone import write_initial_checkpoint
    from aladin.config import BackboneConfig
    from aladin.train import WEIGHTS

    work, env = project
    world = write_coco_world(tmp_path / "upstream", n_train=16, n_restval=4, n_val=6, n_test=8, seed=2)
    words = {w for image in world["images"] for c in image["captions"] for w in c.lower().rstrip(".").split()}
    vinvl = tmp_path / "coco_ir"  # a VinVL-format retrieval checkpoint, tiny, with the features' 262-d input
    write_initial_checkpoint(vinvl, sorted(words), BackboneConfig(hidden_size=32, num_hidden_layers=1,
                                                                  intermediate_size=64), 262, seed=4)
    with serving() as server:
        downloads = serve(server, {**world["files"], **checkpoint_files(vinvl, "vinvl")}, work / "downloads")
        tiny = {"downloads." + k: v for k, v in downloads.items()} | {
            "features.blocks": [1, 1, 1, 1], "features.groups": 1, "features.width_per_group": 64,
            "features.stem_channels": 8, "features.min_size": 64, "features.max_size": 112,
            "features.batch_size": 16, "features.detector.checkpoint": "", "features.detector.labelmap": "",
            "model.img_feature_dim": 262, "model.matching_ff": 32,
            "train_alignment.epochs": 1, "train_alignment.batch_size": 16, "train_alignment.lr": 5.0e-4,
            "eval.fold_size": 4, "eval.batch_size": 16, "eval.chunk_size": 8, "eval.latency_queries": 4,
        } | {f"peers.{name}.{k}": v for name, values in MICRO["peers"].items() for k, v in values.items()} | {
            "peers.selfalign.conv_channels": [4] * 7, "peers.teran.ffn": 32,
        }
        (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
        out = run([sys.executable, "-m", "aladin.presets", "--profile", "paper", "--recipe",
                   "alignment-and-matching-distill", "--extra", str(tmp_path / "tiny.yaml"), "--run"], work, env)
    assert "dvc exp run -n paper-alignment-and-matching-distill" in out
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert (params["data"]["source"], params["backbone"]["init"], params["features"]["mode"]) == \
        ("coco", "vinvl", "detect")
    assert params["train_alignment"]["losses"] == ["alignment", "distillation"]
    metrics = json.loads((work / "metrics/eval.json").read_text())
    assert metrics["dataset"] == "coco"
    assert metrics["matching"]["coco_5k"]["n_images"] == 8 and metrics["matching"]["coco_1k_5fold"]["n_folds"] == 2
    # The backbone is the served VinVL folder's weights (loaded strictly), and stage 2 passed stage 1 through.
    assert (work / "data/backbone/vocab.txt").read_bytes() == (vinvl / "vocab.txt").read_bytes()
    assert (work / "models/distill" / WEIGHTS).read_bytes() == (work / "models/alignment" / WEIGHTS).read_bytes()
    assert (work / "reports/report.html").is_file()
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], work, env)
    assert "paper-alignment-and-matching-distill" in shown

"""Bit-for-bit determinism (issue 7): two cold `dvc repro` runs of one commit give the same bytes for every
output but those declared in `.nondeterministic`, and a fresh clone that reproduces leaves git status clean
apart from them.

Setup, on a micro setting. The working tree (less dvc.lock and the outputs git tracks) is copied into a fresh
folder A with micro params and committed; B is a `git clone` of A. Both reproduce at once, from nothing: no
DVC cache, no outputs, no dvc.lock, so every stage runs in both and every output is compared.

Checks:
- every output hash in the two dvc.lock files is equal but the declared ones (a directory output that
  differs is opened file by file, so one declared figure does not excuse its siblings);
- the rest of the two dvc.lock files is equal too (deps, params, commands);
- the declared paths are outputs, so that the list cannot name what no longer exists;
- git status. The issue's statement is about a fresh clone of the repository, whose committed dvc.lock
  matches its code, that runs `dvc repro`. So A's results are committed (as the repository is after a
  repro) and B's HEAD and index are moved onto that commit with B's files left as its own run wrote them:
  B is then such a clone that reproduced (it ran every stage from the same commit, so it also covers stages
  a real clone would skip because their outputs are in git). Its `git status` may list dvc.lock (which
  records the declared outputs' hashes; the masked comparison above shows nothing else in it moved) and
  declared outputs, nothing else; git-ignored outputs do not show.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aladin.io import PipelineError
from aladin.reproducibility import (covers, differing_outputs, expanded_stages, lock_out_hashes, masked_lock,
                                    read_nondeterministic, undeclared, unknown_declarations)
from micro import write_micro_params

ROOT = Path(__file__).resolve().parents[1]
DVC = {"stages": expanded_stages(ROOT / "dvc.yaml", ROOT / "params.yaml")}  # foreach stages as name@item

# Smaller than tests/test_pipeline.py's: the two runs cost mostly process and kernel start-ups; two epochs
# each still cross an epoch boundary (a new permutation, StepLR) with dropout on.
MICRO = {
    "data": {"n_train": 16, "n_val": 8, "n_test": 12, "image_size": 64, "single_1k_size": 12},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112, "batch_size": 16},
    "model": {"matching_ff": 16},
    "train_alignment": {"epochs": 2, "batch_size": 8, "lr_step": 1},
    "distill": {"epochs": 2, "batch_size": 8, "lr_step": 1},
    "eval": {"fold_size": 4, "batch_size": 16, "chunk_size": 8, "latency_queries": 2, "qualitative_queries": 2},
    "benchmark": {"latency_queries": 2, "crossencoder_pairs": 8, "crossencoder_batch_size": 8, "sweep_max": 200,
                  "sweep_queries": 8, "sweep_timed_queries": 2},
    "peers": {"teran": {"text_layers": 1, "d_img": 16, "d_emb": 16, "ffn": 32, "heads": 2, "epochs": 1, "batch_size": 8},
              "selfalign": {"embed_size": 16, "views": 2, "heads": 2, "prototypes": 8, "context_topk": 8, "epochs": 1,
                            "batch_size": 8}},
}


def outs_of(spec: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]


def run(cmd, cwd, env) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def environment(work: Path) -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                DVC_NO_ANALYTICS="true", PYTHONPATH=str(work), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def repro_both(a: Path, b: Path) -> None:
    """`dvc repro` in both folders at once: each is mostly single-threaded process and kernel start-ups."""
    procs = []
    for work in (a, b):
        log = (work.parent / f"{work.name}.log").open("w")
        procs.append((work, log, subprocess.Popen(["dvc", "repro"], cwd=work, env=environment(work), stdout=log,
                                                  stderr=subprocess.STDOUT, text=True)))
    for work, log, proc in procs:
        code = proc.wait()
        log.close()
        assert code == 0, f"dvc repro failed in {work}:\n{(work.parent / f'{work.name}.log').read_text()[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("determinism")
    a, b = base / "a", base / "b"
    outs = [o for spec in DVC["stages"].values() for o in outs_of(spec)]
    # The working tree as it would be committed (tracked files and new ones git does not ignore), less
    # dvc.lock and the outputs git tracks, so that every stage runs.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for f in listed.split("\0"):
        if f and f != "dvc.lock" and not covers(outs, f) and (ROOT / f).is_file():
            (a / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, a / f)
    write_micro_params(a / "params.yaml", MICRO)

    env = environment(a)
    run(["git", "init", "-q"], a, env)
    run(["git", "add", "-A"], a, env)
    run(["git", "commit", "-qm", "micro"], a, env)
    run(["git", "clone", "-q", str(a), str(b)], base, env)
    for work in (a, b):
        run(["dvc", "config", "--local", "core.check_update", "false"], work, environment(work))
    repro_both(a, b)
    # A's results committed, as the repository is after a repro; B's working tree then stands for a fresh
    # clone of that commit that reproduced: its HEAD and index moved there, its files left as B's run wrote them.
    run(["git", "add", "-A"], a, env)
    run(["git", "commit", "-qm", "results"], a, env)
    env = environment(b)
    run(["git", "fetch", "-q", "origin", "HEAD"], b, env)
    run(["git", "reset", "-q", "FETCH_HEAD"], b, env)
    return a, b, read_nondeterministic(ROOT)


def test_every_output_repeats_bit_for_bit_but_the_declared(runs):
    a, b, declared = runs
    differing = differing_outputs(a / "dvc.lock", b / "dvc.lock", a, b)
    assert not undeclared(differing, declared), \
        f"outputs differ between two runs of one commit: {undeclared(differing, declared)} (declared: {declared})"
    assert set(lock_out_hashes(a / "dvc.lock")) == {o for spec in DVC["stages"].values() for o in outs_of(spec)}


def test_declared_paths_are_outputs(runs):
    a, _, declared = runs
    assert not unknown_declarations(declared, a / "dvc.lock", a), \
        f".nondeterministic names paths that no stage writes: {unknown_declarations(declared, a / 'dvc.lock', a)}"


def test_dvc_lock_changes_only_in_declared_entries(runs):
    a, b, declared = runs
    assert masked_lock(a / "dvc.lock", declared) == masked_lock(b / "dvc.lock", declared)


def test_fresh_clone_leaves_git_status_clean_but_the_declared(runs):
    _, b, declared = runs
    status = run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], b, environment(b))
    changed = [entry[3:] for entry in status.split("\0") if entry]
    # dvc.lock records the declared outputs' hashes; test_dvc_lock_changes_only_in_declared_entries checks
    # that nothing else in it moved.
    assert not undeclared([p for p in changed if p != "dvc.lock"], declared), status


# ---------------------------------------------------------------------------------------------------
# The declaration file and the comparison on hand-made inputs


def test_only_leaf_stages_read_nondeterministic_outputs():
    """Nothing downstream of a timing may be expected to repeat: a stage that reads a declared output must
    be a leaf (none of its outputs read by another stage), its differing outputs declared in turn."""
    declared = read_nondeterministic(ROOT)
    deps = {name: spec.get("deps", []) for name, spec in DVC["stages"].items()}
    for name, spec in DVC["stages"].items():
        tainted = [d for d in spec.get("deps", []) if covers(declared, d) or any(covers([d], x) for x in declared)]
        if tainted:
            readers = [other for other, ds in deps.items() if any(covers(outs_of(spec), d) for d in ds)]
            assert not readers, f"stage {name} reads {tainted} (nondeterministic) and feeds {readers}"


def test_read_nondeterministic_parses_comments_and_rejects_bad_paths(tmp_path):
    (tmp_path / ".nondeterministic").write_text("# timings\nmetrics/latency.json\n\n  reports/figures/  # all\n"
                                                "./eval/x.json\n")
    assert read_nondeterministic(tmp_path) == ["metrics/latency.json", "reports/figures", "eval/x.json"]
    for bad, message in (("/abs/path\n", ":1: '/abs/path' is not a path"), ("a\n../b\n", ":2: '../b'"),
                         ("a\n# c\na/\n", ":3: a is listed twice")):
        (tmp_path / ".nondeterministic").write_text(bad)
        with pytest.raises(PipelineError, match=message):
            read_nondeterministic(tmp_path)
    assert covers(["reports/figures"], "reports/figures/x.png") and covers(["a/b"], "a/b")
    assert not covers(["reports/fig"], "reports/figures/x.png") and not covers(["a/b"], "a")


def write_lock(path: Path, figures_md5: str, latency_md5: str, eval_md5: str) -> Path:
    lock = {"schema": "2.0", "stages": {
        "evaluate": {"cmd": "python -m stages.evaluate", "outs": [
            {"path": "metrics/eval.json", "hash": "md5", "md5": eval_md5, "size": 10},
            {"path": "metrics/latency.json", "hash": "md5", "md5": latency_md5, "size": 10}]},
        "report": {"cmd": "python -m stages.report",
                   "deps": [{"path": "metrics/latency.json", "hash": "md5", "md5": latency_md5, "size": 10}],
                   "outs": [{"path": "reports/figures", "hash": "md5", "md5": figures_md5, "size": 4, "nfiles": 2}]}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(lock))
    return path


def test_differing_outputs_opens_directories_file_by_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, curve in ((a, b"curve"), (b, b"curve")):
        (root / "reports/figures").mkdir(parents=True)
        (root / "reports/figures/curves.png").write_bytes(curve)
    (a / "reports/figures/latency.png").write_bytes(b"1 ms")
    (b / "reports/figures/latency.png").write_bytes(b"2 ms")
    (b / "reports/figures/extra.png").write_bytes(b"new")
    lock_a = write_lock(a / "dvc.lock", "f1.dir", "l1", "e1")
    lock_b = write_lock(b / "dvc.lock", "f2.dir", "l2", "e1")
    assert lock_out_hashes(lock_a) == {"metrics/eval.json": "e1", "metrics/latency.json": "l1",
                                       "reports/figures": "f1.dir"}
    assert differing_outputs(lock_a, lock_b) == ["metrics/latency.json", "reports/figures"]
    assert differing_outputs(lock_a, lock_b, a, b) == ["metrics/latency.json", "reports/figures/extra.png",
                                                       "reports/figures/latency.png"]
    declared = ["metrics/latency.json", "reports/figures/latency.png"]
    assert undeclared(differing_outputs(lock_a, lock_b, a, b), declared) == ["reports/figures/extra.png"]
    # The latency dep of report and the figures folder that holds a declared file lose their content fields.
    assert masked_lock(lock_a, declared) == masked_lock(lock_b, declared)
    assert masked_lock(lock_a, declared) != masked_lock(write_lock(b / "other.lock", "f2.dir", "l2", "e2"), declared)
    assert unknown_declarations(declared + ["reports/figures/gone.png", "metrics/old.json"], lock_a, a) == \
        ["reports/figures/gone.png", "metrics/old.json"]


def test_expanded_stages_unrolls_foreach_like_dvc(tmp_path):
    (tmp_path / "params.yaml").write_text("peers:\n  recipes: [a, b]\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "plain": {"cmd": "x", "outs": ["o"]},
        "train": {"foreach": "${peers.recipes}", "do": {"cmd": "t --r ${item}", "outs": ["m/${item}"]}}}}))
    stages = expanded_stages(tmp_path / "dvc.yaml", tmp_path / "params.yaml")
    assert stages == {"plain": {"cmd": "x", "outs": ["o"]}, "train@a": {"cmd": "t --r a", "outs": ["m/a"]},
                      "train@b": {"cmd": "t --r b", "outs": ["m/b"]}}


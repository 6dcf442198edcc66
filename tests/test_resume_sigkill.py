"""Crash safety of training (issue 7): a stage killed with SIGKILL in the middle of an epoch and run again ends
with the same weights and the same DVCLive history as an uninterrupted run; a state write that dies half-way
leaves the previous state."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dvclive import Live
from micro import micro_world
from safetensors.torch import load_file

from aladin.backbone import load_backbone, load_tokenizer
from aladin.config import ConfigError, load_params, params_from_dict
from aladin.distributed import Distributed
from aladin.model import Aladin
from aladin.pairs import PairBatches, load_training_pairs, pair_loader
from aladin.regions import RegionFeatures
from aladin.splits import load_split
from aladin.train import Progress, Recipe, ResumeCheckpoint, fit, recover_resume_dir, save_model, seed_everything
from stages import train_alignment
from stages.training import resume_live, trim_history

ROOT = Path(__file__).resolve().parents[1]
CPU = Distributed(0, 1, 0, torch.device("cpu"))
# 12 training images, 60 pairs, 15 batches of 4 an epoch: a state every 2 steps leaves a wide window to kill in.
MICRO = {
    "data": {"n_train": 12, "n_val": 6, "n_test": 6, "image_size": 64, "single_1k_size": 3},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112},
    "model": {"matching_ff": 16},
    # Dropout on, all three losses, distillation from epoch 1, the lr stepped every epoch: all state matters.
    "train_alignment": {"epochs": 2, "batch_size": 4, "checkpoint_every": 2, "lr_step": 1,
                        "losses": ["alignment", "distillation", "matching"], "loss_weights": [1.0, 1.0, 0.1],
                        "activate_distillation_after": 1},
    "eval": {"fold_size": 3},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the stage subprocesses (ONE_THREAD): as fast for these tiny models, immune
    to OpenMP threads spinning on a loaded machine, and the same kernels in every run compared bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("resume")
    micro_world(root, MICRO)
    return root


def stage_args(world, out, resume_dir):
    return ["--params", str(world / "params.yaml"), "--dataset", str(world / "dataset"), "--features",
            str(world / "features"), "--backbone", str(world / "backbone"), "--out", str(out), "--live",
            f"{out}_live", "--resume-dir", str(resume_dir), "--device", "cpu"]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_weights(a: Path, b: Path) -> None:
    got, want = load_file(a), load_file(b)
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k  # bit for bit


# ---------------------------------------------------------------------------------------------------
# The stage CLI, killed with SIGKILL


def test_stage_killed_mid_epoch_resumes_to_the_uninterrupted_result(world, tmp_path):
    # Reference: the same stage, uninterrupted (in-process; the loop is the same code as the CLI's).
    assert train_alignment.main(stage_args(world, tmp_path / "a", tmp_path / "ra")) == 0

    cmd = [sys.executable, "-m", "stages.train_alignment", *stage_args(world, tmp_path / "b", tmp_path / "rb")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **ONE_THREAD)
    state = tmp_path / "rb" / "state" / "state.json"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            meta = json.loads(state.read_text())
        except (OSError, ValueError):  # not written yet
            meta = None
        if meta is not None and meta["batch"] > 0:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = (meta["epoch"], meta["batch"])
            break
        time.sleep(0.002)
    output = proc.communicate()[0]
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, output
    # The process may have saved once more before the signal landed, or died between the two renames.
    folder = state.parent if state.parent.exists() else next((tmp_path / "rb").glob(".state.old-*"))
    left = json.loads((folder / "state.json").read_text())
    assert left["epoch"] < 2, left  # unfinished

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    where = f"epoch {left['epoch']}" + (f", batch {left['batch']}" if left["batch"] else "")
    assert f"resume: continuing from {where} (" in rerun.stdout, rerun.stdout

    assert_same_weights(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    assert files_under(tmp_path / "b") == files_under(tmp_path / "a")  # training.json: same best epoch, metrics
    for name in ("state/model.safetensors", "state/optimizer.safetensors", "state/rng.safetensors",
                 "best/model.safetensors"):
        assert (tmp_path / "rb" / name).read_bytes() == (tmp_path / "ra" / name).read_bytes(), name
    # DVCLive: every history row once, the same values, and the same summary.
    histories = files_under(tmp_path / "a_live" / "plots")
    assert histories == files_under(tmp_path / "b_live" / "plots")
    loss_rows = histories["metrics/train/loss.tsv"].decode().splitlines()
    assert loss_rows[0] == "step\tloss" and [r.split("\t")[0] for r in loss_rows[1:]] == ["0", "1"]
    assert (tmp_path / "a_live" / "metrics.json").read_text() == (tmp_path / "b_live" / "metrics.json").read_text()
    assert not [p for p in (tmp_path / "rb").iterdir() if p.name.startswith(".")]  # no temporary leftovers


# ---------------------------------------------------------------------------------------------------
# The loop, interrupted in-process


class Crash(Exception):
    pass


class CrashAfter:
    """`loader`, raising after `batches` batches in all (a crash in the middle of an epoch)."""

    def __init__(self, loader, batches: int):
        self.loader, self.left = loader, batches

    def __iter__(self):
        for batch in self.loader:
            if self.left == 0:
                raise Crash()
            self.left -= 1
            yield batch


def training_parts(world, workers=0):
    params = load_params(world / "params.yaml")
    cfg = params.train_alignment
    seed_everything(params.seed)
    features = RegionFeatures(world / "features", expected_dim=params.model.img_feature_dim)
    tokenizer = load_tokenizer(world / "backbone")
    cpi = params.data.captions_per_image
    val = load_split(world / "dataset", features, "val", tokenizer, params.model, params.compat, cpi)
    pairs = load_training_pairs(world / "dataset", features, "train", tokenizer, params.model, params.compat, cpi)
    model = Aladin(load_backbone(world / "backbone"), params.model, params.compat)
    recipe = Recipe.from_config(cfg, params.compat)
    recipe.prepare(model)
    sampler = PairBatches(len(pairs), cfg.batch_size, torch.Generator().manual_seed(params.seed))
    loader = pair_loader(pairs, sampler, workers, False, params.seed)
    return model, recipe, sampler, loader, val, params.eval


def run_fit(world, resume_dir, crash_after=None, disturb=False, workers=0):
    model, recipe, sampler, loader, val, ev = training_parts(world, workers)
    reports = []
    if disturb:  # as in a fresh process: every RNG somewhere else than where the crashed run left it
        torch.manual_seed(999)
        random.seed(999)
        np.random.seed(999)
    resume = ResumeCheckpoint(resume_dir, "fingerprint", recipe.epochs)
    if resume.state is None:
        resume.clear()
    source = loader if crash_after is None else CrashAfter(loader, crash_after)
    best = fit(model, recipe, source, sampler, val, ev.batch_size, ev.chunk_size, CPU,
               lambda epoch, m: reports.append((epoch, m)),
               lambda epoch, m: save_model(model, resume.best_dir, world / "backbone", {"epoch": epoch}),
               resume, checkpoint_every=4)
    return model, reports, best


def test_mid_epoch_state_resumed_in_process_gives_the_same_weights(world, tmp_path):
    ref_model, ref_reports, ref_best = run_fit(world, tmp_path / "ref")
    assert len(ref_reports) == 2
    # 15 batches an epoch; 7 batches into epoch 1 is global step 22; the last state is at step 20.
    with pytest.raises(Crash):
        run_fit(world, tmp_path / "cut", crash_after=15 + 7)
    meta = json.loads((tmp_path / "cut" / "state" / "state.json").read_text())
    assert (meta["epoch"], meta["batch"], len(meta["losses"]), meta["reports"]) == (1, 5, 5, 1)
    # Resumed with worker processes, which prefetch from the sampler as soon as the epoch starts.
    model, reports, best = run_fit(world, tmp_path / "cut", disturb=True, workers=2)
    assert [e for e, _ in reports] == [1]  # epoch 0 is not reported again
    assert reports[0][1] == ref_reports[1][1]  # the epoch's mean loss, lr and validation: all equal
    assert best == ref_best
    want = ref_model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_skipped_batches_are_the_head_of_the_same_order():
    full = PairBatches(23, 4, torch.Generator().manual_seed(7))
    part = PairBatches(23, 4, torch.Generator().manual_seed(7))
    part.skip_next(4)
    assert list(part) == list(full)[4:]
    assert torch.equal(part.generator.get_state(), full.generator.get_state())  # the next epoch is the same
    assert list(part) == list(full)  # skipping applies to one pass only


# ---------------------------------------------------------------------------------------------------
# Atomic state writes


def saved_state(world, directory, batch: int, shift: float):
    """A state at (epoch 0, `batch`) of a model whose weights are all moved by `shift`."""
    model, recipe, sampler, _, _, _ = training_parts(world)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    at = Progress(0, batch, sampler.generator.get_state(), [torch.tensor(0.5)] * batch)
    ResumeCheckpoint(directory, "fp", 2).save(at, model, optimizer, scheduler, CPU)
    return model


def assert_loads(world, directory, batch: int, weights: dict) -> None:
    resume = ResumeCheckpoint(directory, "fp", 2)
    assert resume.state is not None and resume.state["batch"] == batch, resume.note
    model, recipe, sampler, _, _, _ = training_parts(world)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    at = resume.restore(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1),
                        sampler.generator, CPU)
    assert at.batch == batch and len(at.losses) == batch
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("crash_at", [1, 2])  # renames: the old folder aside, then the new one into place
def test_a_write_that_dies_at_a_rename_keeps_the_previous_state(world, tmp_path, monkeypatch, crash_at):
    old = {k: v.clone() for k, v in saved_state(world, tmp_path, 2, 0.0).state_dict().items()}
    real_replace, calls = os.replace, []

    def crash(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            (new,) = tmp_path.glob(".state.tmp-*")
            assert (new / "state.json").is_file()  # the new state was written in full
            raise Crash()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):
        saved_state(world, tmp_path, 4, 1.0)
    monkeypatch.undo()
    recover_resume_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert_loads(world, tmp_path, 2, old)


def test_what_a_kill_between_the_renames_leaves_is_recovered(world, tmp_path):
    old = {k: v.clone() for k, v in saved_state(world, tmp_path, 2, 0.0).state_dict().items()}
    # `atomic_path` moves the old folder aside, then renames the new one into place; killed in between, the
    # old one is complete under its moved-aside name and a temporary folder may be half written.
    os.replace(tmp_path / "state", tmp_path / ".state.old-4242")
    (tmp_path / ".state.tmp-abc123").mkdir()
    (tmp_path / ".state.tmp-abc123" / "model.safetensors").write_bytes(b"\0" * 10)
    assert ResumeCheckpoint(tmp_path, "fp", 2).state is None  # nothing at the name until recovered
    note = recover_resume_dir(tmp_path)
    assert "put" in note and "removed .state.tmp-abc123" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert_loads(world, tmp_path, 2, old)


# ---------------------------------------------------------------------------------------------------
# DVCLive after a resume


def log(live, step_values):
    for value in step_values:
        live.log_metric("train/loss", value)
        live.log_metric("val/rsum", 100 * value)
        live.next_step()


def test_dvclive_resumes_its_step_without_duplicated_or_missing_rows(tmp_path):
    with Live(str(tmp_path / "ref"), dvcyaml=False, save_dvc_exp=False) as live:
        log(live, [0.5, 0.25, 0.125, 0.0625])
    # A killed run logged steps 0-2 and half a row of step 3, but its last state was saved before step 2.
    with Live(str(tmp_path / "cut"), dvcyaml=False, save_dvc_exp=False) as live:
        log(live, [0.5, 0.25, 0.125])
    with open(tmp_path / "cut" / "plots" / "metrics" / "train" / "loss.tsv", "a") as f:
        f.write("3\t0.06")
    with resume_live(tmp_path / "cut", 2, {}) as live:
        assert live.step == 2
        log(live, [0.125, 0.0625])
    assert files_under(tmp_path / "cut" / "plots") == files_under(tmp_path / "ref" / "plots")
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "ref" / "metrics.json").read_text())
    trim_history(tmp_path / "cut", 0)  # back to the header alone
    assert (tmp_path / "cut" / "plots" / "metrics" / "val" / "rsum.tsv").read_text() == "step\trsum\n"


def test_checkpoint_every_is_read_and_must_not_be_negative(world):
    assert load_params(world / "params.yaml").train_alignment.checkpoint_every == 2
    with pytest.raises(ConfigError, match="distill.checkpoint_every must be >= 0"):
        params_from_dict({"distill": {"checkpoint_every": -1}})

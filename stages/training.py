"""The body the two training stages share: flags, data, device, DVCLive, best model, resume state.

The stages differ only in where the model comes from (the backbone folder, or stage 1's model) and in
their params section; the recipe is in that section (`aladin.train.Recipe`).

    python -m stages.train_alignment ... [--device auto|cpu|cuda] [--num-workers N|auto] [--resume-dir DIR]
    torchrun --nproc_per_node 4 -m stages.train_alignment ...      # data parallel, same global batch

DVCLive is created on rank 0 only, with `dvcyaml=False`: the hand-written dvc.yaml owns metrics and plots
(DVC_AND_NOTEBOOKS.md 4.2). With `--resume-dir` the loop saves its state after every epoch and every
`checkpoint_every` steps; a run whose params and inputs match the saved state (a rerun after a crash or
kill -9) continues from that batch and appends to the DVCLive folder (`resume=True`, 4.4) from the saved
step, dropping any rows a killed run logged after its state was saved.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from dvclive import Live

from aladin.backbone import load_tokenizer
from aladin.config import Params, as_dict, load_params
from aladin.data import KARPATHY_FILE
from aladin.distributed import Distributed, barrier, broadcast_parameters, close, init_distributed
from aladin.io import PipelineError, atomic_path
from aladin.model import Aladin
from aladin.pairs import PairBatches, default_workers, load_training_pairs, pair_loader
from aladin.regions import RegionFeatures, check_model_dim
from aladin.retrieval import split_to
from aladin.splits import load_split
from aladin.train import (Recipe, ResumeCheckpoint, fingerprint, fit, recover_resume_dir, save_model, seed_everything,
                          validate)
from stages.common import run


def log_epoch(live, metrics: dict) -> None:
    """One DVCLive step per epoch, in the fixed namespace of DVC_AND_NOTEBOOKS.md 4.2.

    A pass-through stage (epochs 0) logs only the validation of the model it passes on, at step 0.
    """
    if "train_loss" in metrics:
        live.log_metric("train/loss", metrics["train_loss"])
        live.log_metric("train/lr", metrics["lr"])
    for head, values in metrics["val"].items():
        live.log_metric(f"val/{head}/rsum", values["rsum"])
    live.log_metric("val/selection_rsum", metrics["selection_rsum"])
    live.next_step()


def training_parser(doc: str, source_flag: str) -> argparse.ArgumentParser:
    """Flags of a training stage; `source_flag` names the folder the model starts from."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument(source_flag, required=True, dest="source")
    p.add_argument("--out", required=True)
    p.add_argument("--live", required=True)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when available (under torchrun: GPU LOCAL_RANK)")
    p.add_argument("--num-workers", default="auto",
                   help="DataLoader processes reading training regions: a number (0: in the main process) or "
                        "auto (0 when training on the CPU, whose cores the model needs; on CUDA up to 8, "
                        "sharing the CPUs among the ranks). Results do not depend on it")
    p.add_argument("--resume-dir", default=None,
                   help="folder for the resume state, saved every epoch and every checkpoint_every steps (a "
                        "persistent output); omitted: no resume")
    return p


def stage_fingerprint(params: Params, section: str, name: str, source: str, dataset: str, features: str) -> str:
    """What the stage's results depend on: its params (all but `epochs` and `checkpoint_every`), its input
    files, and the code.

    The code counts because DVC re-runs a stage when one of its source deps changes; a bug fix in the loss
    must not resume (and so keep) a state the old code trained. It is the source of every module of this
    project the stage has imported, and the torch version.
    """
    cfg = as_dict(getattr(params, section))
    cfg.pop("epochs")
    cfg.pop("checkpoint_every")  # when states are saved does not change the results
    config = {"stage": name, "seed": params.seed, "captions_per_image": params.data.captions_per_image,
              "model": as_dict(params.model), "compat": as_dict(params.compat), section: cfg,
              "eval": {"batch_size": params.eval.batch_size, "chunk_size": params.eval.chunk_size},
              "torch": torch.__version__}
    code = sorted({Path(m.__file__) for n, m in list(sys.modules.items())
                   if n.split(".")[0] in ("aladin", "stages") and getattr(m, "__file__", None)})
    model_files = sorted(p for p in Path(source).iterdir() if p.is_file())
    feats = Path(features)
    small = [feats / "imageid2idx.json", feats / "features.lineidx", feats / "predictions.lineidx"]
    files = code + model_files + [Path(dataset) / KARPATHY_FILE] + [p for p in small if p.is_file()]
    return fingerprint(config, files, sampled=[feats / "features.tsv", feats / "predictions.tsv"])


def num_workers(flag: str, d: Distributed) -> int:
    """`--num-workers`: a count, or auto (`aladin.pairs.default_workers`)."""
    if flag == "auto":
        return default_workers(d.device, d.world_size)
    if not flag.isdigit():
        raise PipelineError(f"--num-workers must be a non-negative integer or auto, got {flag!r}")
    return int(flag)


def trim_history(live_dir, step: int) -> None:
    """Drop the rows of step `step` and later (and a row cut short by a kill) from DVCLive's metric
    histories, so that a run resumed at `step` logs each step once."""
    for path in sorted((Path(live_dir) / "plots" / "metrics").rglob("*.tsv")):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        header = next(csv.reader([lines[0]], delimiter="\t"))
        column = header.index("step") if "step" in header else None
        kept = [lines[0]]
        for line in lines[1:]:
            row = next(csv.reader([line], delimiter="\t"), [])
            whole = line.endswith("\n") and len(row) == len(header)
            if whole and column is not None and row[column].isdigit() and int(row[column]) < step:
                kept.append(line)
        if kept != lines:
            with atomic_path(path) as tmp:
                tmp.write_text("".join(kept), encoding="utf-8")


def resume_live(live_dir, step: int, best_metrics: dict) -> Live:
    """DVCLive continuing at `step` after a resume: later rows dropped, the summary read back (or, if a kill
    cut metrics.json short, started again) and its best epoch taken from the resume state."""
    trim_history(live_dir, step)
    summary = Path(live_dir) / "metrics.json"
    try:
        json.loads(summary.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (ValueError, UnicodeDecodeError):
        summary.unlink()  # every value in it is logged again at the next step
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=True)
    live.step = step
    if best_metrics:
        live.summary["best"] = {"epoch": best_metrics["epoch"], "selection_rsum": best_metrics["selection_rsum"]}
    return live


def _copy_model(src: Path, out: str) -> None:
    with atomic_path(out, directory=True) as tmp:
        for f in sorted(src.iterdir()):
            shutil.copy2(f, tmp / f.name)


def run_training(args, name: str, section: str, build: Callable[[Params, str], Aladin]) -> int:
    """Train the model `build(params, source_dir)` returns under the recipe of `params.<section>`.

    The best epoch's weights go to `args.out` (safetensors + JSON) each time validation improves, and every
    epoch is logged to DVCLive under `args.live`. `epochs: 0` passes the model through unchanged.
    """

    def body() -> int:
        params = load_params(args.params)
        cfg = getattr(params, section)
        d = init_distributed(args.device)
        try:
            return train(params, cfg, d, num_workers(args.num_workers, d))
        finally:
            close(d)

    def train(params: Params, cfg, d: Distributed, workers: int) -> int:
        seed_everything(params.seed)
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        check_model_dim(features, args.source)
        tokenizer = load_tokenizer(args.source)
        val = load_split(args.dataset, features, "val", tokenizer, params.model, params.compat,
                         params.data.captions_per_image)
        pairs = None
        if cfg.epochs > 0:  # a pass-through reads no training data
            pairs = load_training_pairs(args.dataset, features, "train", tokenizer, params.model, params.compat,
                                        params.data.captions_per_image)
        recipe = Recipe.from_config(cfg, params.compat)
        model = build(params, args.source)
        recipe.prepare(model)
        model.to(d.device)
        broadcast_parameters(model, d)
        if d.active:
            torch.manual_seed(params.seed + d.rank)  # distinct dropout per rank; rank 0 keeps the seed
        val = split_to(val, d.device)
        meta = {"stage": name, "params": {k: as_dict(getattr(params, k)) for k in ("model", "compat", section)}}

        if cfg.epochs == 0:
            return pass_through(params, recipe, model, val, meta, d)

        resume = None
        if args.resume_dir:
            if d.is_main:
                note = recover_resume_dir(args.resume_dir)
                if note:
                    print(note)
            barrier(d)
            resume = ResumeCheckpoint(args.resume_dir, stage_fingerprint(params, section, name, args.source,
                                                                          args.dataset, args.features), cfg.epochs)
            if d.is_main:
                print(resume.note)
            barrier(d)  # every rank has read the state before rank 0 may clear it
            if resume.state is None and d.is_main:
                resume.clear()
        resuming = resume is not None and resume.state is not None
        if resuming and d.is_main and resume.state["best_epoch"] is not None:
            _copy_model(resume.best_dir, args.out)  # DVC removed the non-persistent --out before the rerun

        generator = torch.Generator().manual_seed(params.seed)
        sampler = PairBatches(len(pairs), cfg.batch_size, generator, d.rank, d.world_size)
        loader = pair_loader(pairs, sampler, workers, d.device.type == "cuda", params.seed)
        live = None
        if d.is_main:  # one DVCLive step per epoch; a resumed run continues at the saved one
            live = (resume_live(args.live, resume.state["reports"], resume.state["best_metrics"]) if resuming
                    else Live(args.live, dvcyaml=False, save_dvc_exp=False))

        def on_best(epoch, metrics):
            if not d.is_main:
                return
            save_model(model, args.out, args.source, dict(meta, best_epoch=epoch, metrics=metrics))
            if resume is not None:
                _copy_model(Path(args.out), str(resume.best_dir))
            live.summary["best"] = {"epoch": epoch, "selection_rsum": metrics["selection_rsum"]}

        def on_epoch_end(epoch, metrics):
            if d.is_main:
                log_epoch(live, metrics)

        with live if live is not None else contextlib.nullcontext():
            best = fit(model, recipe, loader, sampler, val, params.eval.batch_size, params.eval.chunk_size, d,
                       on_epoch_end, on_best, resume, cfg.checkpoint_every)
        barrier(d)
        if d.is_main:
            if best:
                print(f"{name}: best epoch {best['epoch']}, selection rsum {best['selection_rsum']:.1f} -> {args.out}")
            else:
                print(f"{name}: the resume state had finished every epoch; best model -> {args.out}")
        return 0

    def pass_through(params: Params, recipe: Recipe, model: Aladin, val, meta: dict, d: Distributed) -> int:
        """epochs 0: the incoming model, unchanged, and its validation as DVCLive step 0."""
        if not d.is_main:
            return 0
        val_metrics = validate(model, val, params.eval.batch_size, params.eval.chunk_size)
        metrics = {"val": val_metrics, "selection_rsum": recipe.selection_rsum(val_metrics)}
        save_model(model, args.out, args.source, dict(meta, passthrough=True, best_epoch=None, metrics=metrics))
        with Live(args.live, dvcyaml=False, save_dvc_exp=False) as live:
            live.summary["passthrough"] = True
            log_epoch(live, metrics)
        print(f"{name}: epochs 0, the incoming model passed through unchanged -> {args.out}")
        return 0

    return run(body)


"""The body the two training stages share: flags, split loading, DVCLive, best-checkpoint keeping.

DVCLive is created here only, with `dvcyaml=False`: the hand-written dvc.yaml owns metrics and plots
(DVC_AND_NOTEBOOKS.md 4.2).
"""
from __future__ import annotations

import argparse
from typing import Callable

from dvclive import Live

from aladin.backbone import load_tokenizer
from aladin.config import Params, as_dict, load_params
from aladin.regions import RegionFeatures
from aladin.splits import load_split
from aladin.train import fit, save_model, seed_everything
from stages.common import run


def log_epoch(live, metrics: dict) -> None:
    """One DVCLive step per epoch, in the fixed namespace of DVC_AND_NOTEBOOKS.md 4.2."""
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
    return p


def run_training(args, name: str, section: str, build: Callable[[Params, str], tuple]) -> int:
    """Load the train and val splits, build (model, stage) with `build(params, source_dir)`, fit, keep the best.

    The best epoch's weights go to `args.out` (safetensors + JSON) each time validation improves, and every
    epoch is logged to DVCLive under `args.live`.
    """

    def body() -> int:
        params = load_params(args.params)
        seed_everything(params.seed)
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        tokenizer = load_tokenizer(args.source)
        splits = {s: load_split(args.dataset, features, s, tokenizer, params.model, params.compat,
                                params.data.captions_per_image) for s in ("train", "val")}
        model, stage = build(params, args.source)
        meta = {"stage": name, "params": {k: as_dict(getattr(params, k)) for k in ("model", "compat", section)}}
        with Live(args.live, dvcyaml=False, save_dvc_exp=False) as live:
            def on_best(epoch, metrics):
                save_model(model, args.out, args.source, dict(meta, best_epoch=epoch, metrics=metrics))
                live.summary["best"] = {"epoch": epoch, "selection_rsum": metrics["selection_rsum"]}

            best = fit(model, stage, splits["train"], splits["val"], params.seed, params.compat,
                       params.eval.batch_size, params.eval.chunk_size, lambda e, m: log_epoch(live, m), on_best)
        print(f"{name}: best epoch {best['epoch']}, selection rsum {best['selection_rsum']:.1f} -> {args.out}")
        return 0

    return run(body)

"""Train one of ALADIN's neighbours (a recipe of aladin.recipes: teran, selfalign) on the pipeline's data.

The same training pairs and batch order as ALADIN's stages (seeded from params), the recipe's own
architecture and schedule from `peers.<recipe>`; the weights of the best validation rsum are kept.

Reads   --dataset DIR, --features DIR, --backbone DIR (the initial BERT: its text layers and tokenizer),
        params.yaml sections seed, data.captions_per_image, model, compat, eval, peers.<recipe>
Writes  --out DIR (model.safetensors, recipe.json), --live DIR (DVCLive, one step per epoch)
Run     dvc repro train_peer@teran
"""
from __future__ import annotations

import argparse

import torch
from dvclive import Live

from aladin.backbone import load_tokenizer
from aladin.config import as_dict, load_params
from aladin.distributed import resolve_device
from aladin.io import PipelineError, atomic_path, write_json
from aladin.pairs import PairBatches, default_workers, load_training_pairs, pair_loader
from aladin.peers import build_recipe, fit, schedule_of
from aladin.regions import RegionFeatures
from aladin.retrieval import split_to
from aladin.splits import load_split
from aladin.train import WEIGHTS, seed_everything
from safetensors.torch import save_file
from stages.common import run

RECIPE_META = "recipe.json"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--recipe", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--live", required=True)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (one device; no torchrun for the peers)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        seed_everything(params.seed)
        recipe, cfg = build_recipe(params, args.recipe, args.backbone, args.params)
        schedule = schedule_of(cfg)
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        tokenizer = load_tokenizer(args.backbone)
        val = load_split(args.dataset, features, "val", tokenizer, params.model, params.compat,
                         params.data.captions_per_image)
        pairs = load_training_pairs(args.dataset, features, "train", tokenizer, params.model, params.compat,
                                    params.data.captions_per_image)
        device = resolve_device(args.device)
        sampler = PairBatches(len(pairs), schedule.batch_size, torch.Generator().manual_seed(params.seed))
        loader = pair_loader(pairs, sampler, default_workers(device), device.type == "cuda", params.seed)
        recipe.to(device)
        val = split_to(val, device)

        with Live(args.live, dvcyaml=False, save_dvc_exp=False) as live:
            def on_epoch_end(epoch, metrics):
                for k, v in metrics["train"].items():
                    live.log_metric(f"train/{k}", v)
                live.log_metric(f"val/{args.recipe}/rsum", metrics["val"]["rsum"])
                live.next_step()

            try:
                best = fit(recipe, schedule, loader, val, params.eval, device, on_epoch_end)
            except ValueError as e:
                raise PipelineError(f"{args.recipe}: {e}") from None
            live.summary["best"] = best
        state = {k: v.detach().cpu().contiguous() for k, v in recipe.state_dict().items()}
        with atomic_path(args.out, directory=True) as tmp:
            save_file(state, str(tmp / WEIGHTS))
            write_json(tmp / RECIPE_META, {"recipe": args.recipe, "config": as_dict(cfg), "best": best})
        print(f"train_peer {args.recipe}: best epoch {best['epoch']}, val rsum {best['rsum']:.1f} -> {args.out}")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())

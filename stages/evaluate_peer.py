"""Evaluate one of ALADIN's neighbours with ALADIN's evaluator: the same test split, the same protocols
(vinvl_1k, coco_1k_5fold, coco_5k), recall, medr, meanr, rsum and NDCG@25; and its per-query latency.

Reads   --dataset DIR, --features DIR, --backbone DIR (tokenizer), --model DIR (train_peer's output),
        params.yaml sections seed, data, model, compat, eval, peers.<recipe>
Writes  --metrics FILE (metrics/peers/<recipe>.json, deterministic; the recipe is the head),
        --latency FILE (metrics/peers/<recipe>.latency.json, timings)
Run     dvc repro evaluate_peer@teran
"""
from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from safetensors.torch import load_file

from aladin.backbone import load_tokenizer
from aladin.config import load_params
from aladin.distributed import resolve_device
from aladin.io import PipelineError, atomic_path, dumps_json
from aladin.evaluate import run_labels
from aladin.peers import build_recipe, evaluate, query_latency
from aladin.regions import RegionFeatures
from aladin.retrieval import split_to
from aladin.splits import load_split
from aladin.train import WEIGHTS, seed_everything
from stages.common import run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--recipe", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--latency", required=True)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        seed_everything(params.seed)
        recipe, _ = build_recipe(params, args.recipe, args.backbone, args.params)
        weights = Path(args.model) / WEIGHTS
        if not weights.is_file():
            raise PipelineError(f"{weights}: file not found (--model, the output of train_peer)")
        missing, unexpected = recipe.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise PipelineError(f"{weights}: does not match peers.{args.recipe}; missing keys: "
                                f"{', '.join(missing) or '-'}; unexpected keys: {', '.join(unexpected) or '-'}")
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        test = load_split(args.dataset, features, "test", load_tokenizer(args.backbone), params.model,
                          params.compat, params.data.captions_per_image)
        device = resolve_device(args.device)
        recipe.to(device)
        test = split_to(test, device)
        metrics, _ = evaluate(recipe, test, params.eval, args.dataset, args.recipe, params.data.source)
        metrics.update(run_labels(params))
        latency = {args.recipe: {"t2i": query_latency(recipe, test, params.eval, params.eval.latency_queries)}}
        with ExitStack() as stack:  # both written before either is renamed into place
            for path, record in ((args.metrics, metrics), (args.latency, latency)):
                stack.enter_context(atomic_path(path)).write_text(dumps_json(record))
        m = metrics[args.recipe]
        print(f"{args.recipe}: rsum {m['coco_1k_5fold']['rsum']:.1f} (folds of {params.eval.fold_size})  "
              f"{m['coco_5k']['rsum']:.1f} (all {len(test.images)})  t2i latency "
              f"{latency[args.recipe]['t2i']['median_ms']:.2f} ms/query")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())

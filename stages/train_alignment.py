"""Stage 1: train the backbone under the alignment head's hinge loss (recipe alad-alignment-triplet).

Reads   --dataset DIR (Karpathy JSON), --features DIR (VinVL features.tsv ...), --backbone DIR (initial
        Oscar-layout checkpoint), params.yaml sections seed, data, model, compat, train_alignment, eval
Writes  --out DIR (model.safetensors, config.json, vocab.txt, training.json: the best epoch by validation
        rsum), --live DIR (DVCLive: metrics.json, plots/metrics/{train,val}/...)
Run     dvc repro train_alignment
"""
from __future__ import annotations

import argparse

from dvclive import Live

from aladin.backbone import load_backbone, load_tokenizer
from aladin.config import as_dict, load_params
from aladin.features import RegionFeatures
from aladin.model import Aladin
from aladin.splits import load_split
from aladin.train import alignment_stage, fit, save_model, seed_everything
from stages.common import log_epoch, run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--live", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        seed_everything(params.seed)
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        tokenizer = load_tokenizer(args.backbone)
        splits = {s: load_split(args.dataset, features, s, tokenizer, params.model, params.compat,
                                params.data.captions_per_image) for s in ("train", "val")}
        model = Aladin(load_backbone(args.backbone), params.model, params.compat)
        stage = alignment_stage(params.train_alignment, params.compat)
        meta = {"stage": "train_alignment", "params": {k: as_dict(getattr(params, k)) for k in
                                                       ("model", "compat", "train_alignment")}}
        with Live(args.live, dvcyaml=False, save_dvc_exp=False) as live:
            def on_best(epoch, metrics):
                save_model(model, args.out, args.backbone, dict(meta, best_epoch=epoch, metrics=metrics))
                live.summary["best"] = {"epoch": epoch, "selection_rsum": metrics["selection_rsum"]}

            best = fit(model, stage, splits["train"], splits["val"], params.seed, params.compat,
                       params.eval.batch_size, params.eval.chunk_size, lambda e, m: log_epoch(live, m), on_best)
        print(f"train_alignment: best epoch {best['epoch']}, selection rsum {best['selection_rsum']:.1f} -> {args.out}")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())

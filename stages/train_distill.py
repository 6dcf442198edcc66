"""Stage 2: distil the alignment head into the matching head (recipe alad-matching-distill-finetune).

The backbone of stage 1 is frozen; only the matching head trains, by ListNet distillation of the
alignment scores (`distill.mode: listnet`, `distill.temperature` multiplies the student scores) or by the
hinge loss on its own scores (`distill.mode: triplet`, the alad-matching-triplet-finetune baseline).

Reads   --dataset DIR, --features DIR, --teacher DIR (output of train_alignment),
        params.yaml sections seed, data, model, compat, distill, eval
Writes  --out DIR (model.safetensors, config.json, vocab.txt, training.json), --live DIR (DVCLive)
Run     dvc repro train_distill | dvc exp run -S distill.temperature=4.0
"""
from __future__ import annotations

import argparse

from dvclive import Live

from aladin.backbone import load_tokenizer
from aladin.config import as_dict, load_params
from aladin.features import RegionFeatures
from aladin.splits import load_split
from aladin.train import distill_stage, fit, load_model, save_model, seed_everything
from stages.common import log_epoch, run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--live", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        seed_everything(params.seed)
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        tokenizer = load_tokenizer(args.teacher)
        splits = {s: load_split(args.dataset, features, s, tokenizer, params.model, params.compat,
                                params.data.captions_per_image) for s in ("train", "val")}
        model = load_model(args.teacher, params.model, params.compat)
        for p in model.backbone.parameters():
            p.requires_grad_(False)  # freeze-teran: True
        stage = distill_stage(params.distill, params.compat)
        meta = {"stage": "train_distill", "params": {k: as_dict(getattr(params, k)) for k in
                                                     ("model", "compat", "distill")}}
        with Live(args.live, dvcyaml=False, save_dvc_exp=False) as live:
            def on_best(epoch, metrics):
                save_model(model, args.out, args.teacher, dict(meta, best_epoch=epoch, metrics=metrics))
                live.summary["best"] = {"epoch": epoch, "selection_rsum": metrics["selection_rsum"]}

            best = fit(model, stage, splits["train"], splits["val"], params.seed, params.compat,
                       params.eval.batch_size, params.eval.chunk_size, lambda e, m: log_epoch(live, m), on_best)
        print(f"train_distill: best epoch {best['epoch']}, matching rsum {best['selection_rsum']:.1f} -> {args.out}")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())

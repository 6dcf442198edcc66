"""Data stage: generate the synthetic image-caption dataset and the initial backbone checkpoint.

Reads   --params FILE (sections seed, data, backbone, model.img_feature_dim)
Writes  --out DIR             images/*.png, dataset_coco.json (Karpathy split), annotations/captions.json
                              and annotations/instances.json (COCO formats); see aladin/data.py
        --backbone-out DIR    optional: a randomly initialised VinVL-layout BERT whose vocabulary covers
                              every caption word and class name (aladin.backbone.write_initial_checkpoint)
Run     python -m stages.data --params params.yaml --out data/dataset --backbone-out data/backbone
        dvc repro data

Every output is written under a temporary name and renamed, so a failed run leaves the previous output
or none. The same seed and params give byte-identical files. Prints one summary line; a bad params file
or input prints one `error: ...` line and exits with 1.
"""
from __future__ import annotations

import argparse

from aladin import synthetic, synthetic_data
from aladin.config import load_params
from stages.common import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.data", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--backbone-out", default=None, help="initial backbone checkpoint folder to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        counts = synthetic_data.write_dataset(args.out, params.data, params.seed)
        if args.backbone_out is not None:
            from aladin import backbone  # torch and transformers: imported only when a backbone is asked for

            backbone.write_initial_checkpoint(args.backbone_out, words=synthetic.vocabulary(), cfg=params.backbone,
                                              img_feature_dim=params.model.img_feature_dim, seed=params.seed)
        note = f"; initial backbone in {args.backbone_out}" if args.backbone_out else ""
        print(f"data: {counts['images']} images ({counts['train']} train, {counts['val']} val, "
              f"{counts['test']} test), {counts['captions']} captions, {counts['objects']} objects "
              f"in {args.out}{note}")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())

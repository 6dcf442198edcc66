"""Extract region features for every image of the dataset (VinVL layout; VINVL.md 6, ALADIN.md 6.3-6.5).

Reads   --data DIR (the data stage's folder: dataset_coco.json, annotations/instances.json, images/),
        --params FILE sections seed, features, and model.img_feature_dim (must equal D + 6)
Writes  --out DIR: features.tsv + features.lineidx (image_id, num_boxes, base64 float32[num_boxes x (D+6)]),
        predictions.tsv + predictions.lineidx (image_id, {"image_h", "image_w", "objects": [{"rect",
        "class", "conf"}]}), imageid2idx.json ({"<image_id>": row}); the folder is replaced as a whole
Run     dvc repro features
        python -m stages.features --params params.yaml --data data/dataset --out data/features

Regions are the annotation boxes (features.mode given_boxes, confidence 1.0), pooled from a C4 ResNet
with seeded random weights (params seed) on the embedded profile. Prints images per second at the end.
"""
from __future__ import annotations

import argparse
import sys
import time

from aladin.config import load_params
from aladin.features import extract_dataset, feature_dim, region_dim
from aladin.io import PipelineError
from stages.common import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.features", description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--data", required=True, help="dataset folder written by the data stage")
    p.add_argument("--out", required=True, help="output folder for the feature files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        cfg = params.features
        if region_dim(cfg) != params.model.img_feature_dim:
            raise PipelineError(f"{args.params}: the extractor writes D+6 = {feature_dim(cfg)}+6 = "
                                f"{region_dim(cfg)} values per region (32 x features.stem_channels + 6) but "
                                f"model.img_feature_dim is {params.model.img_feature_dim}")
        start = time.perf_counter()
        n = extract_dataset(args.data, args.out, params)
        seconds = time.perf_counter() - start
        print(f"features: {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s) -> {args.out}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())

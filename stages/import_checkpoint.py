"""Import a released ALADIN checkpoint (`model_best_rsum.pth.tar`) into our model folder format.

The file is a torch pickle holding the state dict and an argparse Namespace; it is read with a restricted
unpickler that admits only what such a file needs (aladin/legacy.py), every tensor is mapped onto our model
through an explicit key map (ALADIN.md 10), and the result is written as `model.safetensors`, `config.json`,
`vocab.txt` and `training.json`, the layout `stages.evaluate --model` reads. No training is involved:

    python -m stages.import_checkpoint --params params.yaml --checkpoint model_best_rsum.pth.tar \\
        --backbone data/backbone --out models/released
    python -m stages.evaluate --params params.yaml --dataset data/dataset --features data/features \\
        --model models/released --metrics metrics/released.json --latency metrics/released_latency.json \\
        --qualitative eval/released_qualitative.json

(`make released CHECKPOINT=...` runs both on the paper profile.) Reads params sections model and compat;
--backbone is the VinVL coco_ir folder whose config.json and vocab.txt the checkpoint was trained with.
"""
from __future__ import annotations

import argparse

from aladin.config import load_params
from aladin.legacy import convert
from stages.common import run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--checkpoint", required=True, help="released model_best_rsum.pth.tar")
    p.add_argument("--backbone", required=True, help="VinVL coco_ir folder (config.json, vocab.txt)")
    p.add_argument("--out", required=True, help="model folder to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        meta = convert(args.checkpoint, args.out, params.model, params.compat, args.backbone)
        print(f"import_checkpoint: {args.checkpoint} (epoch {meta['epoch']}, {meta['Eiters']} iterations, "
              f"sha256 {meta['source']['sha256'][:12]}...) -> {args.out}")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())

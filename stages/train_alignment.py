"""Stage 1: train the backbone under the alignment head's hinge loss (recipe alad-alignment-triplet).

Reads   --dataset DIR (Karpathy JSON), --features DIR (VinVL features.tsv ...), --backbone DIR (initial
        Oscar-layout checkpoint), params.yaml sections seed, data, model, compat, train_alignment, eval
Writes  --out DIR (model.safetensors, config.json, vocab.txt, training.json: the best epoch by validation
        rsum), --live DIR (DVCLive: metrics.json, plots/metrics/{train,val}/...)
Run     dvc repro train_alignment
"""
from __future__ import annotations

from aladin.backbone import load_backbone
from aladin.model import Aladin
from aladin.train import alignment_stage
from stages.training import run_training, training_parser


def build(params, backbone_dir):
    model = Aladin(load_backbone(backbone_dir), params.model, params.compat)
    return model, alignment_stage(params.train_alignment, params.compat)


def main(argv=None) -> int:
    args = training_parser(__doc__, "--backbone").parse_args(argv)
    return run_training(args, "train_alignment", "train_alignment", build)


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage 1: train from the initial backbone under the recipe of `train_alignment` (alad-alignment-triplet by
default: the whole backbone under the alignment head's hinge loss; the matching head starts random).

Reads   --dataset DIR (Karpathy JSON), --features DIR (VinVL features.tsv ...), --backbone DIR (initial
        Oscar-layout checkpoint), params.yaml sections seed, data, model, compat, train_alignment, eval
Writes  --out DIR (model.safetensors, config.json, vocab.txt, training.json: the best epoch by validation
        rsum), --live DIR (DVCLive: metrics.json, plots/metrics/{train,val}/...), --resume-dir DIR (the
        resume state, saved every epoch and every checkpoint_every steps; a rerun after a kill continues
        from it; optional)
Flags   --device auto|cpu|cuda, --num-workers N; under torchrun, data parallel over the ranks
Run     dvc repro train_alignment
"""
from __future__ import annotations

from aladin.backbone import load_backbone
from aladin.model import Aladin
from stages.training import run_training, training_parser


def build(params, backbone_dir) -> Aladin:
    return Aladin(load_backbone(backbone_dir), params.model, params.compat)


def main(argv=None) -> int:
    args = training_parser(__doc__, "--backbone").parse_args(argv)
    return run_training(args, "train_alignment", "train_alignment", build)


if __name__ == "__main__":
    raise SystemExit(main())

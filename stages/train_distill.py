"""Stage 2: train stage 1's model further under the recipe of `distill` (alad-matching-distill-finetune by
default: the backbone frozen, the matching head distilled from the alignment head by ListNet, the
temperature multiplying the student scores; `losses: [matching]` is the triplet baseline; `epochs: 0`
passes stage 1's model through unchanged, for the single-stage recipes).

Reads   --dataset DIR, --features DIR, --teacher DIR (output of train_alignment),
        params.yaml sections seed, data, model, compat, distill, eval
Writes  --out DIR (model.safetensors, config.json, vocab.txt, training.json), --live DIR (DVCLive),
        --resume-dir DIR (the resume state, saved every epoch and every checkpoint_every steps; optional)
Flags   --device auto|cpu|cuda, --num-workers N; under torchrun, data parallel over the ranks
Run     dvc repro train_distill | dvc exp run -S distill.temperature=4.0
"""
from __future__ import annotations

from aladin.model import Aladin
from aladin.train import load_model
from stages.training import run_training, training_parser


def build(params, teacher_dir) -> Aladin:
    return load_model(teacher_dir, params.model, params.compat)


def main(argv=None) -> int:
    args = training_parser(__doc__, "--teacher").parse_args(argv)
    return run_training(args, "train_distill", "distill", build)


if __name__ == "__main__":
    raise SystemExit(main())

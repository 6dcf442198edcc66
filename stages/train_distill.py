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

from aladin.train import distill_stage, load_model
from stages.training import run_training, training_parser


def build(params, teacher_dir):
    model = load_model(teacher_dir, params.model, params.compat)
    for p in model.backbone.parameters():
        p.requires_grad_(False)  # freeze-teran: True
    return model, distill_stage(params.distill, params.compat)


def main(argv=None) -> int:
    args = training_parser(__doc__, "--teacher").parse_args(argv)
    return run_training(args, "train_distill", "distill", build)


if __name__ == "__main__":
    raise SystemExit(main())

"""Training ALADIN's two stages with one loop.

Stage 1 (`train_alignment`, recipe alad-alignment-triplet): the whole backbone trains under the hinge
loss with hardest negatives on the alignment head's MrSw scores. Stage 2 (`train_distill`, recipe
alad-matching-distill-finetune): the backbone is frozen and only the matching head trains, by ListNet
distillation of the (detached) alignment scores, or by the hinge loss on its own cosine scores.

Adam (no weight decay), epoch-level StepLR, gradient clipping on all parameters, validation rsum every
epoch, best checkpoint kept (ALADIN.md 5). The loop knows nothing of DVC: it reports through a callback.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backbone import OscarBackbone, load_config, load_state_exactly
from .config import CompatConfig, ModelConfig, TrainConfig
from .evaluation import i2t, rsum, t2i
from .io import PipelineError, atomic_path
from .losses import hinge_triplet, listnet_distillation
from .model import Aladin
from .retrieval import alignment_similarities, encode_split, matching_similarities
from .splits import SplitInputs, batches, training_pairs

WEIGHTS = "model.safetensors"
META = "training.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------------------------------------------
# Validation


def validate(model: Aladin, split: SplitInputs, batch_size: int, chunk_size: int) -> dict:
    """rsum of both heads on a split (the original validates on VinVL's minival)."""
    enc = encode_split(model, split, batch_size)
    result = {}
    for head, sims in (("matching", matching_similarities(enc)),
                       ("alignment", alignment_similarities(model, enc, chunk_size))):
        a, b = i2t(sims, split.image_of_caption), t2i(sims, split.image_of_caption)
        result[head] = {"rsum": rsum(a, b), "i2t_r1": a["r1"], "t2i_r1": b["r1"]}
    return result


# ---------------------------------------------------------------------------------------------------
# One loop for both stages


@dataclass
class Stage:
    name: str  # "alignment" or "distill"
    epochs: int
    batch_size: int
    lr: float
    lr_step: int
    lr_gamma: float
    grad_clip: float
    loss: Callable  # (model, images, texts) -> scalar loss
    selection: Callable  # validation dict -> the number that picks the best checkpoint
    frozen_backbone: bool


def alignment_stage(cfg: TrainConfig, compat: CompatConfig) -> Stage:
    def loss(model: Aladin, images, texts):
        img_set, txt_set = model.alignment_sets(model.image_tokens(images), model.text_tokens(texts))
        scores = model.alignment_scores(img_set, txt_set)  # (B, B) MrSw, positives on the diagonal
        return hinge_triplet(scores, cfg.margin, cfg.max_violation)

    def selection(v):
        # Quirk Q8: the original adds the (untrained) matching head's rsum whenever the alignment loss runs.
        return v["alignment"]["rsum"] + (v["matching"]["rsum"] if compat.val_rsum_sum_heads else 0.0)

    return Stage("alignment", cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_step, cfg.lr_gamma, cfg.grad_clip,
                 loss, selection, frozen_backbone=False)


def distill_stage(cfg: TrainConfig, compat: CompatConfig) -> Stage:
    def loss(model: Aladin, images, texts):
        with torch.no_grad():  # frozen backbone (freeze-teran: True); the teacher is detached anyway
            img_tok, txt_tok = model.image_tokens(images), model.text_tokens(texts)
            if "distillation" in cfg.losses:
                teacher = model.alignment_scores(*model.alignment_sets(img_tok, txt_tok))  # (B, B)
        student = model.embed_images(img_tok) @ model.embed_texts(txt_tok).T  # (B, B) cosine
        if "distillation" in cfg.losses:
            return listnet_distillation(student, teacher, cfg.temperature)
        return hinge_triplet(student, cfg.margin, cfg.max_violation)

    return Stage("distill", cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_step, cfg.lr_gamma, cfg.grad_clip,
                 loss, lambda v: v["matching"]["rsum"], frozen_backbone=True)


def fit(model: Aladin, stage: Stage, train: SplitInputs, val: SplitInputs, seed: int, compat: CompatConfig,
        eval_batch_size: int, chunk_size: int, on_epoch_end: Callable[[int, dict], None],
        on_best: Callable[[int, dict], None]) -> dict:
    """Train for `stage.epochs`; call `on_epoch_end(epoch, metrics)` and `on_best(epoch, metrics)`.

    Returns the metrics of the best epoch. Raises PipelineError if the loss becomes NaN or infinite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=stage.lr, foreach=True)  # same maths, fewer kernel launches
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=stage.lr_step, gamma=stage.lr_gamma)
    generator = torch.Generator().manual_seed(seed)
    best, best_metrics = float("-inf"), {}
    for epoch in range(stage.epochs):
        model.train()
        if stage.frozen_backbone and not compat.frozen_backbone_dropout:
            model.backbone.eval()  # the clean alternative to quirk Q9
        lr = optimizer.param_groups[0]["lr"]
        total, n_batches = 0.0, 0
        for step, idx in enumerate(batches(training_pairs(train, generator), stage.batch_size)):
            images = train.images[train.image_of_caption[idx]]
            texts = train.texts[idx]
            loss = stage.loss(model, images, texts)
            if not torch.isfinite(loss):
                raise PipelineError(f"{stage.name}: loss is {loss.item()} at epoch {epoch}, step {step}; "
                                    "stopping (the best checkpoint so far is kept)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            optimizer.step()
            total += loss.item()
            n_batches += 1
        scheduler.step()
        val_metrics = validate(model, val, eval_batch_size, chunk_size)
        metrics = {"train_loss": total / max(1, n_batches), "lr": lr, "val": val_metrics,
                   "selection_rsum": stage.selection(val_metrics)}
        improved = metrics["selection_rsum"] > best
        if improved:
            best, best_metrics = metrics["selection_rsum"], dict(metrics, epoch=epoch)
            on_best(epoch, metrics)
        on_epoch_end(epoch, metrics)
    return best_metrics


# ---------------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights + JSON, never pickles


def save_model(model: Aladin, out_dir, backbone_dir, meta: dict) -> None:
    """Write `model.safetensors`, the backbone's `config.json` and `vocab.txt`, and `training.json`."""
    backbone_dir = Path(backbone_dir)
    with atomic_path(out_dir, directory=True) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "config.json").write_text(model.backbone.config.to_json_string(use_diff=False))
        (tmp / "vocab.txt").write_bytes((backbone_dir / "vocab.txt").read_bytes())
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_model(model_dir, model_cfg: ModelConfig, compat: CompatConfig) -> Aladin:
    """Rebuild an ALADIN model saved by `save_model`, strictly (every tensor accounted for)."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    model = Aladin(OscarBackbone(config), model_cfg, compat)
    path = model_dir / WEIGHTS
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    load_state_exactly(model, load_file(path), [], f"{path}: does not match params (model, compat)")
    return model

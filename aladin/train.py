"""Training ALADIN: one loop for every recipe of the original code (ALADIN.md 3, 4, 5).

A stage's recipe is a `TrainConfig` (the original's `loss-type`, `loss-weights`, `freeze-teran`, ...) with the
quirk switches of `CompatConfig`. Its loss is sum_k loss_weights[k] * L_k over `losses`:

    alignment      hinge triplet (hardest negatives) on the alignment head's MrSw scores S_align (B, B)
    matching       hinge triplet on the matching head's cosine scores S_match (B, B)
    distillation   ListNet from the detached S_align (teacher) to temperature * S_match (student)

S_align is computed once per batch when alignment or distillation is in `losses` (ALADIN.md 3.2).
`freeze_backbone` runs the backbone under no_grad with its weights frozen (only the matching head trains);
otherwise everything trains and distillation also reaches the backbone through the student's input tokens.

Adam (no weight decay; fused on CUDA), epoch-level StepLR, gradient clipping on all parameters, optional
bf16 autocast, validation rsum of both heads every epoch, the best checkpoint kept (ALADIN.md 5). After
every epoch, and every `checkpoint_every` steps within one, a resume state (safetensors + JSON, never a
pickle) can be written; a run started again with the same fingerprint, even after a kill -9, continues
from that batch and ends with the same weights as an uninterrupted run. Under torchrun the
global batch is split across ranks and the scores are global (`aladin.distributed`). The loop knows
nothing of DVC: it reports through callbacks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backbone import OscarBackbone, load_config, load_state_exactly
from .config import CompatConfig, ModelConfig, TrainConfig
from .distributed import Distributed, average_gradients, gather_rows, gather_tensors
from .evaluation import i2t, rsum, t2i
from .io import PipelineError, atomic_path
from .losses import hinge_triplet, listnet_distillation
from .model import Aladin, AlignmentSet, Tokens
from .pairs import PairBatches, batch_inputs
from .retrieval import alignment_similarities, encode_split, matching_similarities
from .splits import SplitInputs
from .tokenization import ImageInputs, TextInputs

WEIGHTS = "model.safetensors"
META = "training.json"
LOSS_CHECK_EVERY = 16  # steps between checks that the loss is finite (each check waits for the GPU)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------------------------------------------
# Validation


def validate(model: Aladin, split: SplitInputs, batch_size: int, chunk_size: int) -> dict:
    """rsum of both heads on a split (the original validates on VinVL's minival)."""
    enc = encode_split(model, split, batch_size)
    result = {}
    for head, sims in (("matching", matching_similarities(enc)),
                       ("alignment", alignment_similarities(model, enc, chunk_size))):
        sims = sims.float().cpu()  # (N_images, N_captions)
        a, b = i2t(sims, split.image_of_caption), t2i(sims, split.image_of_caption)
        result[head] = {"rsum": rsum(a, b), "i2t_r1": a["r1"], "t2i_r1": b["r1"]}
    return result


# ---------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Recipe:
    """What one training stage does, from its `TrainConfig` section and the compat switches."""

    losses: tuple[str, ...]
    loss_weights: tuple[float, ...]
    freeze_backbone: bool
    epochs: int
    lr: float
    lr_step: int
    lr_gamma: float
    grad_clip: float
    margin: float
    max_violation: bool
    temperature: float
    activate_distillation_after: int
    precision: str
    val_rsum_sum_heads: bool  # compat Q8
    frozen_backbone_dropout: bool  # compat Q9

    @classmethod
    def from_config(cls, cfg: TrainConfig, compat: CompatConfig) -> "Recipe":
        return cls(cfg.losses, cfg.loss_weights, cfg.freeze_backbone, cfg.epochs, cfg.lr, cfg.lr_step,
                   cfg.lr_gamma, cfg.grad_clip, cfg.margin, cfg.max_violation, cfg.temperature,
                   cfg.activate_distillation_after, cfg.precision, compat.val_rsum_sum_heads,
                   compat.frozen_backbone_dropout)

    def active_losses(self, epoch: int) -> tuple[str, ...]:
        """The losses of `epoch`: distillation waits `activate_distillation_after` epochs when it is not the
        only loss (ALADIN.md 3.5; the original never read the key, Q2)."""
        if epoch < self.activate_distillation_after and len(self.losses) > 1:
            return tuple(k for k in self.losses if k != "distillation")
        return self.losses

    def trained_heads(self) -> list[str]:
        heads = ["alignment"] if "alignment" in self.losses else []
        if "matching" in self.losses or "distillation" in self.losses:
            heads.append("matching")
        return heads

    def selection_rsum(self, val: dict) -> float:
        """The number that picks the best checkpoint (quirk Q8).

        Original (`val_rsum_sum_heads`): matching rsum, plus alignment rsum when the alignment loss runs,
        even when the matching head is not trained. Otherwise: the sum over the heads this stage trains.
        """
        if self.val_rsum_sum_heads:
            return val["matching"]["rsum"] + (val["alignment"]["rsum"] if "alignment" in self.losses else 0.0)
        return sum(val[head]["rsum"] for head in self.trained_heads())

    def prepare(self, model: Aladin) -> list[torch.nn.Parameter]:
        """Freeze the backbone if asked (freeze-teran); returns the parameters the optimiser updates."""
        if self.freeze_backbone:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
        return [p for p in model.parameters() if p.requires_grad]

    def train_mode(self, model: Aladin) -> None:
        model.train()
        if self.freeze_backbone and not self.frozen_backbone_dropout:
            model.backbone.eval()  # the clean alternative to quirk Q9


def _float_tokens(x: Tokens) -> Tokens:
    return Tokens(x.tokens.float(), x.lengths)


def _gather_set(s: AlignmentSet, d: Distributed) -> AlignmentSet:
    return AlignmentSet(gather_rows(s.tokens, d), gather_rows(s.mask, d))


def batch_loss(model: Aladin, recipe: Recipe, images: ImageInputs, texts: TextInputs, epoch: int,
               d: Distributed) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's loss on one (global) batch; returns (loss, {name: unweighted term}).

    The encoders run under whatever autocast the caller set; the score matrices and the losses are
    computed in fp32 with autocast off (the MrSw sums and the ListNet softmaxes lose too much in bf16).
    Under torchrun `images` and `texts` are this rank's slice; tokens and embeddings are gathered (with
    their gradient) so every score matrix is the global (B, B).
    """
    active = recipe.active_losses(epoch)
    need_alignment = "alignment" in active or "distillation" in active
    need_matching = "matching" in active or "distillation" in active
    frozen = torch.no_grad() if recipe.freeze_backbone else contextlib.nullcontext()
    with frozen:  # freeze-teran: the backbone forward keeps no graph
        img_tok, txt_tok = model.image_tokens(images), model.text_tokens(texts)  # (n, R, H), (n, L, H)
    device_type = img_tok.tokens.device.type
    s_align = s_match = None
    if need_alignment:
        # Only a teacher (no alignment loss): no graph needed.
        teacher_only = torch.no_grad() if "alignment" not in active else contextlib.nullcontext()
        with teacher_only, torch.autocast(device_type, enabled=False):
            img_set, txt_set = model.alignment_sets(_float_tokens(img_tok), _float_tokens(txt_tok))
            s_align = model.alignment_scores(_gather_set(img_set, d), _gather_set(txt_set, d))  # (B, B)
    if need_matching:
        img_emb, txt_emb = model.embed_images(img_tok), model.embed_texts(txt_tok)  # (n, H) each
        with torch.autocast(device_type, enabled=False):
            s_match = gather_rows(img_emb.float(), d) @ gather_rows(txt_emb.float(), d).T  # (B, B) cosine
    with torch.autocast(device_type, enabled=False):
        terms = {}
        if "alignment" in active:
            terms["alignment"] = hinge_triplet(s_align, recipe.margin, recipe.max_violation)
        if "matching" in active:
            terms["matching"] = hinge_triplet(s_match, recipe.margin, recipe.max_violation)
        if "distillation" in active:
            terms["distillation"] = listnet_distillation(s_match, s_align.detach(), recipe.temperature)
        weights = dict(zip(recipe.losses, recipe.loss_weights))
        loss = None
        for name in active:
            weighted = weights[name] * terms[name]
            loss = weighted if loss is None else loss + weighted
    return loss, terms


# ---------------------------------------------------------------------------------------------------
# One optimisation step


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam as the original (betas 0.9/0.999, eps 1e-8, no weight decay); fused kernels on CUDA, the
    multi-tensor path on the CPU: the same update, fewer kernel launches."""
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)


def autocast_for(precision: str, device: torch.device):
    """bf16: autocast around the forward (weights and optimiser state stay fp32); fp32: the original."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: Aladin, recipe: Recipe, images: ImageInputs, texts: TextInputs, epoch: int,
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               d: Distributed) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, gradient average over ranks, clipping, Adam.

    Returns (loss, gradient norm before clipping), both detached scalars left on the device (no sync).
    """
    with autocast_for(recipe.precision, d.device):
        loss, _ = batch_loss(model, recipe, images, texts, epoch, d)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params, d)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
    optimizer.step()
    return loss.detach(), grad_norm.detach()


# ---------------------------------------------------------------------------------------------------
# The loop


def _check_finite(losses: list[torch.Tensor], first_step: int, epoch: int) -> None:
    """`losses` are the batches `first_step`, `first_step + 1`, ... of `epoch`; the first NaN or inf stops
    training. Nothing diverged was written: states and best models are saved only after this check."""
    values = torch.stack(losses).tolist()
    for i, v in enumerate(values):
        if not np.isfinite(v):
            raise PipelineError(f"loss is {v} at epoch {epoch}, batch {first_step + i} of the epoch (both counted "
                                "from 0); training stopped. The best model so far (--out) and the last resume "
                                "state (--resume-dir), both from before this batch, are kept")


@dataclass
class Progress:
    """Where the loop stands; all of it goes into a resume state.

    The next batch to run is batch `batch` of epoch `epoch`. `order` is the sampler generator's state at the
    start of `epoch`: the epoch's order is drawn from it again on a resume and its first `batch` batches
    skipped. `losses` holds the loss of each batch of `epoch` run so far (the epoch's mean needs them all),
    `reports` the epochs reported through `on_epoch_end` (a logger's next step), `best` and `best_metrics`
    the best epoch so far.
    """

    epoch: int = 0
    batch: int = 0
    order: torch.Tensor | None = None
    losses: list[torch.Tensor] = field(default_factory=list)  # () each, on the device
    reports: int = 0
    best: float = float("-inf")
    best_metrics: dict = field(default_factory=dict)


def fit(model: Aladin, recipe: Recipe, loader: Iterable, sampler: PairBatches, val: SplitInputs,
        eval_batch_size: int, chunk_size: int, d: Distributed, on_epoch_end: Callable[[int, dict], None],
        on_best: Callable[[int, dict], None], resume: "ResumeCheckpoint | None" = None,
        checkpoint_every: int = 0) -> dict:
    """Train `recipe.epochs` epochs over `loader`; call `on_best(epoch, metrics)` when the selection rsum
    improves and then `on_epoch_end(epoch, metrics)`, on every rank (callers write on rank 0 only).

    `loader` yields collated batches (`aladin.pairs`) in the order `sampler` draws from its generator. With
    `resume`, a saved state of the same fingerprint is restored first, possibly in the middle of an epoch,
    and a new one is written after every epoch and, with `checkpoint_every` > 0, after every global step
    that is a multiple of it (except an epoch's last, whose end state follows). Returns the metrics of the
    best epoch. Raises PipelineError if the loss becomes NaN or infinite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe.lr, d.device)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.lr_step, gamma=recipe.lr_gamma)
    at = Progress()
    if resume is not None and resume.state is not None:
        at = resume.restore(model, optimizer, scheduler, sampler.generator, d)
    steps_per_epoch = len(sampler)
    while at.epoch < recipe.epochs:
        epoch = at.epoch
        recipe.train_mode(model)
        lr = optimizer.param_groups[0]["lr"]
        at.order = sampler.generator.get_state()  # before the loader draws this epoch's order
        sampler.skip_next(at.batch)
        checked = len(at.losses)  # restored losses were checked before they were saved
        for batch in loader:
            images, texts = batch_inputs(batch, d.device)
            loss, _ = train_step(model, recipe, images, texts, epoch, optimizer, params, d)
            at.losses.append(loss)
            at.batch += 1
            if len(at.losses) - checked >= LOSS_CHECK_EVERY:
                _check_finite(at.losses[checked:], checked, epoch)
                checked = len(at.losses)
            step = epoch * steps_per_epoch + at.batch
            if (resume is not None and checkpoint_every and step % checkpoint_every == 0
                    and at.batch < steps_per_epoch):
                if at.losses[checked:]:  # never save a diverged state
                    _check_finite(at.losses[checked:], checked, epoch)
                    checked = len(at.losses)
                resume.save(at, model, optimizer, scheduler, d)
        if at.losses[checked:]:
            _check_finite(at.losses[checked:], checked, epoch)
        total = 0.0
        for value in torch.stack(at.losses).tolist() if at.losses else []:
            total += value  # summed in order in float64, as the loss was logged before
        scheduler.step()
        val_metrics = validate(model, val, eval_batch_size, chunk_size)
        metrics = {"train_loss": total / max(1, len(at.losses)), "lr": lr, "val": val_metrics,
                   "selection_rsum": recipe.selection_rsum(val_metrics)}
        if metrics["selection_rsum"] > at.best:
            at.best, at.best_metrics = metrics["selection_rsum"], dict(metrics, epoch=epoch)
            on_best(epoch, metrics)
        on_epoch_end(epoch, metrics)
        at = Progress(epoch + 1, 0, sampler.generator.get_state(), [], at.reports + 1, at.best, at.best_metrics)
        if resume is not None:
            resume.save(at, model, optimizer, scheduler, d)
    return at.best_metrics


# ---------------------------------------------------------------------------------------------------
# Resume state: safetensors for tensors, JSON for the rest, never a pickle

STATE = "state"  # <resume dir>/state: the last saved position
BEST = "best"  # <resume dir>/best: the best model so far, a `save_model` folder
STATE_FORMAT = 2  # 2: mid-epoch positions


def file_digest(path: Path, sampled: bool = False) -> str:
    """sha256 of a file; `sampled` reads 64 blocks of 64 KiB spread over it (and its size) instead, for
    the multi-GB feature files, where any re-extraction changes every block."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if not sampled or size <= 64 * 2**16 * 2:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            for i in range(64):
                f.seek((size - 2**16) * i // 63)
                h.update(f.read(2**16))
    return h.hexdigest()


def fingerprint(config: dict, files: Iterable[Path], sampled: Iterable[Path] = ()) -> str:
    """One hash of a stage's params (a JSON-able dict) and the contents of its input files."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in files:
        h.update(f"{path.name}:{file_digest(path)}".encode())
    for path in sampled:
        h.update(f"{path.name}:{file_digest(path, sampled=True)}".encode())
    return h.hexdigest()


def _tensors_of(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {index}.{key} is not a tensor")  # Adam keeps only tensors
            out[f"{index}.{key}"] = value.detach().cpu().contiguous()
    return out


def _rng_tensors(order: torch.Tensor, d: Distributed) -> dict[str, torch.Tensor]:
    """The sampler's epoch-start state and every rank's torch RNG (dropout), gathered on rank 0
    (collective)."""
    out = {"sampler": order}
    for r, s in enumerate(gather_tensors(torch.get_rng_state(), d)):
        out[f"torch.{r}"] = s
    if d.device.type == "cuda":
        for r, s in enumerate(gather_tensors(torch.cuda.get_rng_state(d.device), d)):
            out[f"cuda.{r}"] = s
    return out


def recover_resume_dir(directory) -> str:
    """Undo what a kill during a state write left behind (rank 0, before any rank reads the folder).

    `atomic_path` writes a whole folder under a temporary name, moves the old one aside and renames the new
    one into place. Killed between the two renames, the old folder is complete under its moved-aside name
    and goes back; temporary folders of killed writes are removed. Returns a note, empty if nothing was
    left behind.
    """
    directory = Path(directory)
    notes = []
    for name in (STATE, BEST):
        target = directory / name
        aside = sorted(directory.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if not target.exists() and aside:
            os.replace(aside.pop(), target)
            notes.append(f"put {target} back from a write that was killed")
        for leftover in aside + list(directory.glob(f".{name}.tmp-*")):
            shutil.rmtree(leftover, ignore_errors=True)
            notes.append(f"removed {leftover.name}")
    return "resume: " + "; ".join(notes) if notes else ""


class ResumeCheckpoint:
    """The resume state of one stage in `directory` (`--resume-dir`, a persistent DVC output).

    `state/` holds model.safetensors, optimizer.safetensors, rng.safetensors and state.json (the position:
    next epoch and batch, with that epoch's losses so far; the best so far; scheduler, lr, python and numpy
    RNG; the fingerprint); `best/` the best model so far. Each is replaced as a whole (`atomic_path`), so a
    killed write leaves the previous one (see `recover_resume_dir`). `epochs` is not part of the
    fingerprint: epoch k of a longer run equals epoch k of a shorter one, so a finished run can be extended;
    a state past the requested epochs is not resumed.
    """

    def __init__(self, directory, fingerprint: str, epochs: int):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.state: dict | None = None
        self.note = ""
        folder = self.directory / STATE
        if not (folder / "state.json").is_file():
            self.note = f"resume: no saved state in {self.directory}, starting at epoch 0"
            return
        try:
            meta = json.loads((folder / "state.json").read_text())
        except json.JSONDecodeError as e:
            raise PipelineError(f"{folder / 'state.json'}:{e.lineno}: not valid JSON ({e.msg})") from None
        if meta.get("format") != STATE_FORMAT:
            self.note = f"resume: {self.directory} holds a state of another format; starting fresh"
        elif meta.get("fingerprint") != fingerprint:
            self.note = f"resume: {self.directory} holds a state of other params or inputs; starting fresh"
        elif meta["epoch"] > epochs or (meta["epoch"] == epochs and meta["batch"] > 0):
            self.note = (f"resume: {self.directory} holds epoch {meta['epoch']}, batch {meta['batch']}, past the "
                         f"{epochs} epoch(s) asked for; starting fresh")
        elif meta["best_epoch"] is not None and not (self.directory / BEST / WEIGHTS).is_file():
            self.note = f"resume: {self.directory / BEST} is missing; starting fresh"
        else:
            self.state = meta
            where = f"epoch {meta['epoch']}" + (f", batch {meta['batch']}" if meta["batch"] else "")
            self.note = f"resume: continuing from {where} ({self.directory})"

    @property
    def best_dir(self) -> Path:
        return self.directory / BEST

    def clear(self) -> None:
        """Remove a stale state (rank 0, before a fresh start), so it can never be mistaken for this run's."""
        for name in (STATE, BEST):
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def restore(self, model: Aladin, optimizer, scheduler, generator: torch.Generator,
                d: Distributed) -> Progress:
        """Load the saved state into the run's objects (`generator`: the sampler's, set to the start of the
        saved epoch); returns the saved position."""
        folder, meta = self.directory / STATE, self.state
        weights = load_file(folder / WEIGHTS)
        load_state_exactly(model, weights, [], f"{folder / WEIGHTS}: does not match the model")
        saved = load_file(folder / "optimizer.safetensors")
        current = optimizer.state_dict()
        state: dict = {}
        for key, value in saved.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = current["param_groups"]
        for group, lr in zip(groups, meta["param_groups"]):
            group.update(lr)  # lr and initial_lr; the rest is fixed by make_optimizer
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scheduler.load_state_dict(meta["scheduler"])
        rng = load_file(folder / "rng.safetensors")
        generator.set_state(rng["sampler"])
        own = f"torch.{d.rank}"
        if own in rng:
            torch.set_rng_state(rng[own])
            if d.device.type == "cuda" and f"cuda.{d.rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{d.rank}"], d.device)
        else:  # more ranks than when saved: a fresh dropout stream for this rank
            step = meta["epoch"] * 1_000_003 + meta["batch"]
            torch.manual_seed(int(meta["seed"]) + 1000 * d.rank + step)
        version, internal, gauss = meta["python_random"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = meta["numpy_random"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        # float32 losses written as Python floats (exact) come back as the same float32 values.
        losses = [torch.tensor(v, dtype=torch.float32, device=d.device) for v in meta["losses"]]
        best = meta["best"] if meta["best"] is not None else float("-inf")
        return Progress(meta["epoch"], meta["batch"], rng["sampler"], losses, meta["reports"], best,
                        meta["best_metrics"])

    def save(self, at: Progress, model: Aladin, optimizer, scheduler, d: Distributed) -> None:
        """Write the state at position `at` atomically (collective: every rank calls it, rank 0 writes)."""
        rng = _rng_tensors(at.order, d)
        losses = torch.stack(at.losses).tolist() if at.losses else []
        if not d.is_main:
            return
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        meta = {
            "format": STATE_FORMAT, "fingerprint": self.fingerprint, "epoch": at.epoch, "batch": at.batch,
            "losses": losses, "reports": at.reports,
            "best": at.best if np.isfinite(at.best) else None, "best_epoch": at.best_metrics.get("epoch"),
            "best_metrics": at.best_metrics, "world_size": d.world_size, "seed": int(torch.initial_seed()),
            "scheduler": scheduler.state_dict(),
            "param_groups": [{k: g[k] for k in ("lr", "initial_lr") if k in g} for g in optimizer.param_groups],
            "python_random": [version, list(internal), gauss],
            "numpy_random": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        }
        with atomic_path(self.directory / STATE, directory=True) as tmp:
            save_file(_cpu_state(model), tmp / WEIGHTS, metadata={"format": "pt"})
            save_file(_tensors_of(optimizer), tmp / "optimizer.safetensors", metadata={"format": "pt"})
            save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
            (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# Model folders: safetensors weights + JSON, never pickles


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: Aladin, out_dir, backbone_dir, meta: dict) -> None:
    """Write `model.safetensors`, the backbone's `config.json` and `vocab.txt`, and `training.json`."""
    backbone_dir = Path(backbone_dir)
    with atomic_path(out_dir, directory=True) as tmp:
        save_file(_cpu_state(model), tmp / WEIGHTS, metadata={"format": "pt"})
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

"""Training losses on a batch score matrix (mesnico/ALADIN `alad/loss.py`; ALADIN.md section 3).

Every score matrix here is `[B, B]` with images on rows, captions on columns and the positive pairs on
the diagonal.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_square(name: str, scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{name} must be a square [B, B] score matrix, got shape {tuple(scores.shape)}")


def hinge_triplet(scores: Tensor, margin: float = 0.2, max_violation: bool = True) -> Tensor:
    """VSE++ hinge triplet loss, summed over the batch (ALADIN.md 3.1, `Contrastive.compute_contrastive_loss`).

    cost_s[i, j]  = max(0, margin + S[i, j] - S[i, i])   image i against negative caption j (i2t)
    cost_im[i, j] = max(0, margin + S[i, j] - S[j, j])   caption j against negative image i (t2i)

    With `max_violation` only the hardest negative of each image (row) and of each caption (column)
    counts; otherwise every negative does. The reduction is a sum, not a mean: the original clips
    gradients at 2.0 on this scale (ALADIN.md section 10).

    Args:
        scores: `[B, B]`, rows images, columns captions, positives on the diagonal.
    Returns:
        scalar loss.
    """
    _check_square("scores", scores)
    positive = scores.diagonal()  # (B,)
    cost_s = (margin + scores - positive[:, None]).clamp(min=0)  # (B, B), compared with S[i, i]
    cost_im = (margin + scores - positive[None, :]).clamp(min=0)  # (B, B), compared with S[j, j]
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)  # (B, B)
    cost_s = cost_s.masked_fill(eye, 0.0)
    cost_im = cost_im.masked_fill(eye, 0.0)
    if max_violation:
        return cost_s.amax(dim=1).sum() + cost_im.amax(dim=0).sum()
    return cost_s.sum() + cost_im.sum()


def listnet_distillation(student: Tensor, teacher: Tensor, temperature: float = 6.0, eps: float = 1e-10) -> Tensor:
    """ListNet cross-entropy from the teacher's to the student's score distributions (ALADIN.md 3.3).

    rows (i2t):    P_T = softmax_j(teacher[i]),  P_S = softmax_j(temperature * student[i]) + eps,
                   L_rows = mean_i( -sum_j P_T log P_S )
    columns (t2i): the same along dim 0, averaged over the columns.
    Returns L_rows + L_cols.

    Only the student is scaled (the teacher's raw MrSw sums are already sharp) and there is no T^2
    factor, as in mesnico/ALADIN `alad/loss.py` (`DistillationLoss`). eps is added after the softmax,
    before the log, as the original does. The teacher is detached here, so no gradient reaches it.

    Args:
        student: `[B, B]` matching-head scores, rows images, columns captions.
        teacher: `[B, B]` alignment-head scores, same orientation.
    Returns:
        scalar loss.
    """
    _check_square("student", student)
    _check_square("teacher", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    teacher = teacher.detach()
    logits = temperature * student  # (B, B)

    def cross_entropy(dim: int) -> Tensor:
        p_teacher = torch.softmax(teacher, dim=dim)  # (B, B)
        p_student = torch.softmax(logits, dim=dim) + eps  # (B, B)
        return -(p_teacher * torch.log(p_student)).sum(dim=dim).mean()

    return cross_entropy(1) + cross_entropy(0)

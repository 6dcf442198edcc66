"""SelfAlign on the CAMERA base (PEERS.md section 4): a dual encoder whose score is a dot product.

    regions [N, R, D_in + 6] -> fc -> (region-axis L2) -> x box gate P -> AGSA (+res, BN) -> U_I [N, R, D]
        U_I -> multi-view summarization (7 dilated convs) -> views [N, k, D]
        U_I -> ContextBranch -> guide n(g^) [N, D], keys n(u~_r) [N, R, D], context n(c_I) [N, D]
    caption ids -> frozen BERT -> Lin(H -> D) -> (token-axis L2) -> AGSA (+res, BN) -> U_T [N, L, D]
        U_T -> FFN (+res, BN) -> mean over all L positions -> t [N, D]
        U_T -> ContextBranch -> n(g^_T), n(u~_t), n(c_T)

    e_I^(k) = [view_k ; 1/2 mean_r n(u~_r) ; 1/2 n(c_I)]   [N, k, 3D]
    e_T     = [t ; n(c_T) ; mean_t n(u~_t)]                [N, 3D]
    s(I, T) = max_k <e_I^(k), e_T>                          (PEERS.md 4.5; the 1/2 is hard-coded)

Training adds the concept level (word -> nearest region of its own image, Sinkhorn codes of the regions
as targets, PEERS.md 4.3) and the context level (global query against the other modality's contextual
tokens, InfoNCE over top-k negatives, 4.4). Total: rank + 0.01 diversity + concept + context (4.6).

Serving from a kNN index (index_kind "vector"): every gallery image contributes its k vectors e_I^(k)
(12 in the paper) to one flat inner-product index, each tagged with its image id. A text query searches
that index and max-pools the hits per image id, which is exactly max_k; taking the top n images needs the
top n*k vectors at most. An image query runs its k vectors against the caption index and keeps, per
caption, the largest of the k scores.

Inputs are the project's tensors (`aladin.tokenization`): region rows carry D_in values followed by VinVL's
six geometry values x1/W, y1/H, x2/W, y2/H, w/W, h/H. CAMERA's box code is [x1/W, y1/H, w/W, h/H, w/h,
wh/(WH)]; its pixel aspect w/h is taken as (w/W)/(h/H), which equals w/h only for square images (exact on
the embedded synthetic world, a named deviation on COCO/Flickr). BUTD-36 has no padded regions; here
images have up to R regions, so padded region slots are masked everywhere (a no-op with full images).

Quirks of the released code (PEERS.md 4.11) are reproduced by default; each fix is a config flag:
`fix_norm_axis` (L2 along the feature axis instead of the region/token axis), `mask_text_padding`
(padding out of the text AGSA, BatchNorms, means and t2v keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import load_backbone
from ..losses import hinge_triplet
from ..tokenization import ImageInputs, TextInputs
from .base import Reps, RetrievalRecipe

# PEERS.md 4.10 (CAMERA+SelfAlign, camera_SelfAlign/train_SelfAlign.py); epochs and lr_update are COCO's
# (Flickr30k: 30 and 10).
PAPER = {
    "embed_size": 2048, "views": 12, "heads": 64, "prototypes": 1024, "student_temp": 0.1,
    "sinkhorn_eps": 0.05, "sinkhorn_iters": 2, "prototype_freeze_epochs": 1,
    "context_temp_v2t": 0.7, "context_temp_t2v": 0.7, "context_topk": 512,
    "conv_channels": (256, 128, 128, 128, 128, 128, 128), "conv_kernels": (1, 3, 3, 3, 5, 5, 5),
    "conv_dilations": (1, 1, 2, 3, 1, 2, 3),
    "weight_rank": 1.0, "weight_diversity": 0.01, "weight_concept": 1.0, "weight_context": 1.0,
    "batch_size": 128, "lr": 1e-4, "lr_step": 20, "lr_gamma": 0.1, "epochs": 40, "grad_clip": 2.0, "margin": 0.2,
    "max_words": 32, "dropout": 0.0, "seed": 1024,
}

VARIANTS = ("camera", "lite")
N_GEOMETRY = 6  # VinVL's geometry columns at the end of every region row


@dataclass(frozen=True)
class SelfAlignConfig:
    """Embedded (small) defaults; `PAPER` holds the published values of the same fields."""

    # camera: CAMERA base exactly (paper-comparable) | lite: fc -> AGSA -> mean pool, one view, no
    # diversity term (PEERS.md 4.9 item 2; a named deviation, not paper-comparable)
    variant: str = "camera"
    embed_size: int = 64  # D; paper 2048
    views: int = 4  # k; paper 12 (lite: always 1)
    heads: int = 4  # AGSA heads; paper 64 (d_k 32)
    dropout: float = 0.0
    max_words: int = 32  # text width incl. [CLS]/[SEP]; the text mean runs over all of it (quirk)
    # multi-view summarization: 7 dilated Conv1d over the region axis; paper channels 256,128x6 (sum 1024)
    conv_channels: tuple[int, ...] = (16, 8, 8, 8, 8, 8, 8)
    conv_kernels: tuple[int, ...] = (1, 3, 3, 3, 5, 5, 5)
    conv_dilations: tuple[int, ...] = (1, 1, 2, 3, 1, 2, 3)
    # concept level
    prototypes: int = 64  # K; paper 1024
    student_temp: float = 0.1  # tau_s
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 2
    prototype_freeze_epochs: int = 1  # prototype gradients dropped while epoch < this (CAMERA variant: 1)
    # context level
    context_temp_v2t: float = 0.7  # v5_tao
    context_temp_t2v: float = 0.7  # v6_tao
    context_topk: int = 32  # paper 512
    context_relu: bool = True  # ctx_fc_relu
    # loss weights (PEERS.md 4.6)
    weight_rank: float = 1.0
    weight_diversity: float = 0.01
    weight_concept: float = 1.0
    weight_context: float = 1.0
    # fixes of released-code quirks (PEERS.md 4.11); False reproduces the original
    fix_norm_axis: bool = False
    mask_text_padding: bool = False
    # The original leaves BERT in train mode (freeze_layers only stops gradients), so BERT dropout stays
    # on during training; off here: the frozen backbone always runs in eval mode unless this is set.
    frozen_backbone_dropout: bool = False
    # training (PEERS.md 4.10): Adam on trainable parameters, lr * lr_gamma every lr_step epochs (the
    # original's `lr_update`)
    lr: float = 1e-4
    epochs: int = 4  # paper 40 (COCO) / 30 (Flickr30k)
    batch_size: int = 32  # paper 128
    lr_step: int = 2  # paper 20 (COCO) / 10 (Flickr30k)
    lr_gamma: float = 0.1
    grad_clip: float = 2.0  # global norm
    margin: float = 0.2  # hinge, hardest negatives, summed (max_violation cannot be switched off: 4.11)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"selfalign.variant: {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.embed_size % self.heads:
            raise ValueError(f"selfalign.heads: {self.heads} does not divide embed_size {self.embed_size}")
        if not len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_dilations):
            raise ValueError("selfalign.conv_channels, conv_kernels, conv_dilations: lengths differ")
        if any(k % 2 == 0 for k in self.conv_kernels):
            raise ValueError(f"selfalign.conv_kernels: {self.conv_kernels} must be odd (length-preserving)")
        for name in ("views", "prototypes", "sinkhorn_iters", "context_topk", "max_words", "batch_size",
                     "epochs", "lr_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"selfalign.{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_words < 2:
            raise ValueError(f"selfalign.max_words: must hold [CLS] and [SEP], got {self.max_words}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"selfalign.dropout: must lie in [0, 1), got {self.dropout!r}")
        for name in ("student_temp", "sinkhorn_eps", "context_temp_v2t", "context_temp_t2v"):
            if not getattr(self, name) > 0:
                raise ValueError(f"selfalign.{name}: must be positive, got {getattr(self, name)!r}")

    def loss_weights(self) -> dict[str, float]:
        return {"rank": self.weight_rank, "diversity": self.weight_diversity,
                "concept": self.weight_concept, "context": self.weight_context}

    @classmethod
    def paper(cls, **overrides) -> "SelfAlignConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in PAPER.items() if k in known}, **overrides})


CONFIG = SelfAlignConfig  # the name `aladin.peers` looks up


# ---------------------------------------------------------------------------------------------------
# helpers


def l2norm(x: Tensor, dim: int, mask: Tensor | None = None) -> Tensor:
    """x / ||x|| along `dim`; masked rows (False) are zeroed first so they add nothing to a norm over the
    token axis. The original divides without epsilon; the clamp only guards all-zero columns."""
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis of `[N, L, D]`, over the valid tokens only when `mask` `[N, L]` is given."""
    if mask is None:
        return x.mean(dim=1)
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def token_batchnorm(bn: nn.BatchNorm1d, x: Tensor, mask: Tensor | None) -> Tensor:
    """BatchNorm1d over all tokens of the batch flattened (as the original), valid tokens only with a mask;
    masked positions come back as zeros."""
    if mask is None:
        n, length, d = x.shape
        return bn(x.reshape(n * length, d)).reshape(n, length, d)
    out = x.new_zeros(x.shape)
    out[mask] = bn(x[mask])
    return out


def box6(geometry: Tensor) -> Tensor:
    """CAMERA's absolute box code from VinVL geometry `[..., 6]` (x1/W, y1/H, x2/W, y2/H, w/W, h/H).

    -> `[..., 6]` = x1/W, y1/H, w/W, h/H, w/h, wh/(WH). The aspect w/h is (w/W)/(h/H): exact only for
    square images (deviation named in the module docstring); degenerate heights are clamped.
    """
    x1, y1, w, h = geometry[..., 0], geometry[..., 1], geometry[..., 4], geometry[..., 5]
    return torch.stack([x1, y1, w, h, w / h.clamp_min(1e-6), w * h], dim=-1)


def _xavier(fc: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(fc.weight)  # the original's uniform(+-sqrt(6 / (in + out))), zero bias
    nn.init.zeros_(fc.bias)
    return fc


# ---------------------------------------------------------------------------------------------------
# modules (PEERS.md 4.9 list)


class BoxEncoder6(nn.Module):
    """P = sigmoid(Lin(6 -> D)(box6)): a per-region gate on the fc features (CAMERA's PositionEncoder)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(N_GEOMETRY, dim)

    def forward(self, geometry: Tensor) -> Tensor:  # [N, R, 6] -> [N, R, D]
        return torch.sigmoid(self.proj(box6(geometry)))


class AGSA(nn.Module):
    """One adaptive-gating self-attention layer with its residual: U = res + Dropout(BN(attn(x))).

    Per head (d_k = D / h): G = fc_q(Q) * fc_k(K), M = sigmoid(fc_g(G)) [.., 2 d_k], Q <- Q * M[:d_k],
    K <- K * M[d_k:]; softmax(Q K^T / sqrt(d_k)) V, heads concatenated, no output projection. `mask`
    `[N, L]` (True = valid) hides keys (the original fills -1e9); the text side runs without one (quirk).
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.d_k = heads, dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.fc_q = nn.Linear(self.d_k, self.d_k)
        self.fc_k = nn.Linear(self.d_k, self.d_k)
        self.fc_g = nn.Linear(self.d_k, 2 * self.d_k)
        self.attn_dropout = nn.Dropout(dropout)
        self.bn = nn.BatchNorm1d(dim)
        self.dropout = nn.Dropout(dropout)

    def attend(self, x: Tensor, mask: Tensor | None) -> Tensor:
        n, length, d = x.shape
        q, k, v = (f(x).view(n, length, self.heads, self.d_k).transpose(1, 2) for f in (self.q, self.k, self.v))
        gate = torch.sigmoid(self.fc_g(self.fc_q(q) * self.fc_k(k)))  # [N, h, L, 2 d_k]
        q, k = q * gate[..., : self.d_k], k * gate[..., self.d_k:]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # [N, h, L, L]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], -1e9)
        out = self.attn_dropout(scores.softmax(dim=-1)) @ v  # [N, h, L, d_k]
        return out.transpose(1, 2).reshape(n, length, d)

    def forward(self, x: Tensor, residual: Tensor, mask: Tensor | None = None) -> Tensor:
        return residual + self.dropout(token_batchnorm(self.bn, self.attend(x, mask), mask))  # [N, L, D]


class MultiViewSummarization(nn.Module):
    """A = Lin(sum channels -> k)(concat_i ReLU(Conv1d_i(U'))) over the region axis: `[N, R, D]` -> `[N, R, k]`."""

    def __init__(self, dim: int, views: int, channels, kernels, dilations):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, c, k, dilation=d, padding=d * (k - 1) // 2)
                                   for c, k, d in zip(channels, kernels, dilations))
        self.fc = nn.Linear(sum(channels), views)

    def forward(self, u: Tensor) -> Tensor:
        x = u.transpose(1, 2)  # [N, D, R]
        x = torch.cat([F.relu(conv(x)) for conv in self.convs], dim=1)  # [N, C, R]
        return self.fc(x.transpose(1, 2))  # [N, R, k]


def diversity_reg(summary: Tensor, mask: Tensor | None = None) -> Tensor:
    """L_div = sum_b ||A^T A - I||_F^2, A `[B, R, k]` with columns L2-normalized over the (valid) regions."""
    a = l2norm(summary, dim=1, mask=mask)
    gram = a.transpose(1, 2) @ a  # [B, k, k]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return ((gram - eye) ** 2).sum()


class DiversityReg(nn.Module):
    def forward(self, summary: Tensor, mask: Tensor | None = None) -> Tensor:
        return diversity_reg(summary, mask)


class ContextBranch(nn.Module):
    """g = mean_t u_t; g^ = ReLU(BN1(Lin(g))); u~ = ReLU(BN2(u)); gamma = sigmoid(MLP([g; g^]));
    c = gamma g + (1 - gamma) g^. Returns n(g^) `[N, D]`, n(u~) `[N, L, D]`, n(c) `[N, D]` (PEERS.md 4.4)."""

    def __init__(self, dim: int, relu: bool):
        super().__init__()
        self.relu = relu
        self.fc = nn.Linear(dim, dim)
        self.bn1 = nn.BatchNorm1d(dim)
        self.bn2 = nn.BatchNorm1d(dim)
        self.fusion = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, u: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        g = masked_mean(u, mask)  # [N, D], unnormalized
        guide = self.bn1(self.fc(g))  # [N, D]
        tokens = token_batchnorm(self.bn2, u, mask)  # [N, L, D]
        if self.relu:
            guide, tokens = F.relu(guide), F.relu(tokens)
        gamma = torch.sigmoid(self.fusion(torch.cat([g, guide], dim=-1)))  # [N, 1]
        context = gamma * g + (1 - gamma) * guide
        return F.normalize(guide, dim=-1), l2norm(tokens, dim=-1, mask=mask), F.normalize(context, dim=-1)


@torch.no_grad()
def sinkhorn(scores: Tensor, eps: float, iters: int) -> Tensor:
    """Sinkhorn-Knopp codes of n samples over K prototypes, `[n, K]` -> `[n, K]`, every row summing to 1.

    Q = exp(S^T / eps) / sum; `iters` times: rows (prototypes) to mass 1/K, columns (samples) to 1/n;
    then Q * n transposed (PEERS.md 4.3). The global max is subtracted before exp, which the first
    normalization cancels exactly; it only keeps exp finite.
    """
    q = torch.exp((scores - scores.max()) / eps).t()  # [K, n]
    q = q / q.sum()
    n_protos, n = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / n_protos
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


class Prototypes(nn.Module):
    """C `[K, D]`, a bias-free Linear whose rows are put back on the unit sphere, without gradient, at every
    use (the original renormalizes `v_prototypes.weight` in place at each forward)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.proj = nn.Linear(dim, count, bias=False)

    def normalized(self) -> Tensor:
        with torch.no_grad():
            self.proj.weight.copy_(F.normalize(self.proj.weight, dim=1))
        return self.proj.weight  # [K, D]


class ConceptLoss(nn.Module):
    """L_concept = 1/B sum_b 1/T_b sum_{t < T_b} -sum_k q_{b, r*(t), k} log p_{b, t, k} (PEERS.md 4.3).

    Teacher q: Sinkhorn codes of every valid region of the batch (no_grad). Student p_t = softmax(C w_t /
    tau_s). r*(t) = argmax_r <w_t, v_r> over the regions of the caption's own image (hard). The regions are
    detached, so only the text shallow projection and (unless `freeze`) the prototypes get gradient.
    """

    def __init__(self, dim: int, count: int, student_temp: float, eps: float, iters: int):
        super().__init__()
        self.prototypes = Prototypes(dim, count)
        self.student_temp, self.eps, self.iters = student_temp, eps, iters

    def forward(self, regions: Tensor, region_mask: Tensor, words: Tensor, word_lengths: Tensor,
                freeze: bool = False) -> Tensor:
        """regions `[B, R, D]` (unit), region_mask `[B, R]`, words `[B, L, D]` (unit), word_lengths `[B]`."""
        c = self.prototypes.normalized()  # [K, D]
        v = regions.detach()
        student = (words @ (c.detach() if freeze else c).t()) / self.student_temp  # [B, L, K]
        log_p = F.log_softmax(student, dim=-1)
        with torch.no_grad():
            codes = v.new_zeros(*v.shape[:2], c.shape[0])  # [B, R, K]
            codes[region_mask] = sinkhorn(v[region_mask] @ c.t(), self.eps, self.iters)
            sim = (words @ v.transpose(1, 2)).masked_fill(~region_mask[:, None, :], -torch.inf)  # [B, L, R]
            target = codes.gather(1, sim.argmax(dim=-1)[..., None].expand(-1, -1, c.shape[0]))  # [B, L, K]
        ce = -(target * log_p).sum(dim=-1)  # [B, L]
        valid = torch.arange(words.shape[1], device=words.device)[None, :] < word_lengths[:, None]
        return ((ce * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)).mean()


def context_nce(queries: Tensor, keys: Tensor, temperature: float, topk: int, key_mask: Tensor | None = None,
                self_value: float = -10.0) -> Tensor:
    """CRA: queries `[B, D]`, keys `[B, n, D]` -> mean over valid (b, i) of -log softmax of the positive.

    Positive logit <m_b, l_{b,i}>/T; the negative pool of sample b is every key of the batch divided by T,
    its own keys set to `self_value` (-10, not -inf: quirk), padded keys removed; the top-k of the pool,
    shared by all keys of b, join each positive. When (B-1) n < k the -10 entries enter the top-k (PEERS.md
    4.4). k is capped at the pool size B n; the original's topk raises there instead.
    """
    b, n, _ = keys.shape
    pos = torch.einsum("bd,bnd->bn", queries, keys) / temperature  # [B, n]
    neg = (queries @ keys.reshape(b * n, -1).t()).reshape(b, b, n) / temperature  # [B, B', n]
    own = torch.eye(b, dtype=torch.bool, device=keys.device)[:, :, None].expand(b, b, n)
    neg = neg.masked_fill(own, self_value)
    if key_mask is not None:
        neg = neg.masked_fill(~key_mask[None].expand(b, b, n), -torch.inf)
    top = neg.reshape(b, b * n).topk(min(topk, b * n), dim=1).values  # [B, k]
    logits = torch.cat([pos[..., None], top[:, None, :].expand(b, n, -1)], dim=-1)  # [B, n, 1 + k]
    loss = -F.log_softmax(logits, dim=-1)[..., 0]  # [B, n]
    if key_mask is None:
        return loss.mean()
    return (loss * key_mask).sum() / key_mask.sum().clamp_min(1)


class ContextNCE(nn.Module):
    def __init__(self, temperature: float, topk: int):
        super().__init__()
        self.temperature, self.topk = temperature, topk

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return context_nce(queries, keys, self.temperature, self.topk, key_mask)


# ---------------------------------------------------------------------------------------------------
# the two encoders


class CameraImage(nn.Module):
    """CAMERA image base (PEERS.md 4.7); with `lite`: fc -> AGSA -> mean pool, one view, no summarization."""

    def __init__(self, cfg: SelfAlignConfig, region_dim: int):
        super().__init__()
        d = cfg.embed_size
        self.lite = cfg.variant == "lite"
        self.fix_norm_axis = cfg.fix_norm_axis
        self.fc = _xavier(nn.Linear(region_dim, d))
        self.box = None if self.lite else BoxEncoder6(d)
        self.agsa = AGSA(d, cfg.heads, cfg.dropout)
        self.summary = None if self.lite else MultiViewSummarization(
            d, cfg.views, cfg.conv_channels, cfg.conv_kernels, cfg.conv_dilations)
        self.context = ContextBranch(d, cfg.context_relu)

    def forward(self, feats: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """feats `[N, R, D_in + 6]`, mask `[N, R]` True = real region."""
        x, geometry = feats[..., :-N_GEOMETRY], feats[..., -N_GEOMETRY:]
        f = l2norm(self.fc(x), dim=-1 if self.fix_norm_axis else 1, mask=mask)  # [N, R, D], axis quirk
        gated = f if self.box is None else f * self.box(geometry)
        u = self.agsa(gated, residual=f, mask=mask) * mask[..., None]  # [N, R, D]; residual uses F, not F*P
        out = {"shallow": F.normalize(f, dim=-1), "shallow_mask": mask}
        guide, tokens, context = self.context(u, mask)
        out.update(guide=guide, ctx_tokens=tokens, ctx_tokens_mask=mask, ctx=context)
        if self.lite:
            out["views"] = F.normalize(masked_mean(u, mask), dim=-1)[:, None]  # [N, 1, D]
            return out
        u_n = l2norm(u, dim=-1 if self.fix_norm_axis else 1, mask=mask)  # U', axis quirk
        a = self.summary(u_n)  # [N, R, k]
        weights = a.masked_fill(~mask[..., None], -torch.inf).softmax(dim=1)  # over regions
        out["views"] = F.normalize(weights.transpose(1, 2) @ u_n, dim=-1)  # [N, k, D]
        out["summary"] = a * mask[..., None]
        return out


class CameraText(nn.Module):
    """CAMERA text base on the frozen project backbone (PEERS.md 4.7)."""

    def __init__(self, cfg: SelfAlignConfig, hidden: int):
        super().__init__()
        d = cfg.embed_size
        self.fix_norm_axis, self.mask_padding = cfg.fix_norm_axis, cfg.mask_text_padding
        self.mapping = _xavier(nn.Linear(hidden, d))
        self.agsa = AGSA(d, cfg.heads, cfg.dropout)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.context = ContextBranch(d, cfg.context_relu)

    def forward(self, hidden: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """hidden `[N, L, H]` BERT's last layer at fixed width L, valid `[N, L]` True = real token."""
        mask = valid if self.mask_padding else None  # None: padding takes part (quirk)
        x = l2norm(self.mapping(hidden), dim=-1 if self.fix_norm_axis else 1, mask=mask)  # [N, L, D]
        u = self.agsa(x, residual=x, mask=mask)
        y = self.fc2(self.dropout(F.relu(self.fc1(u))))
        y = u + self.dropout(token_batchnorm(self.bn, y, mask))
        guide, tokens, context = self.context(u, mask)
        out = {"vector": F.normalize(masked_mean(y, mask), dim=-1), "shallow": F.normalize(x, dim=-1),
               "guide": guide, "ctx_tokens": tokens, "ctx": context}
        if mask is not None:
            out["ctx_tokens_mask"] = mask
        return out


# ---------------------------------------------------------------------------------------------------
# the recipe


class SelfAlign(RetrievalRecipe):
    """SelfAlign on CAMERA (or the lite base). `encode_*` in training mode return everything the losses
    need; in eval mode only the index vectors: images {"vectors": [N, k, 3D]}, texts {"vector": [N, 3D]}."""

    name = "selfalign"
    index_kind = "vector"

    def __init__(self, cfg: SelfAlignConfig, backbone: nn.Module, img_feature_dim: int):
        super().__init__()
        if img_feature_dim <= N_GEOMETRY:
            raise ValueError(f"img_feature_dim {img_feature_dim}: regions need values before the "
                             f"{N_GEOMETRY} geometry columns")
        self.cfg = cfg
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.image = CameraImage(cfg, img_feature_dim - N_GEOMETRY)
        self.text = CameraText(cfg, backbone.config.hidden_size)
        self.concept = ConceptLoss(cfg.embed_size, cfg.prototypes, cfg.student_temp, cfg.sinkhorn_eps,
                                   cfg.sinkhorn_iters)
        self.context_v2t = ContextNCE(cfg.context_temp_v2t, cfg.context_topk)
        self.context_t2v = ContextNCE(cfg.context_temp_t2v, cfg.context_topk)
        self.diversity = DiversityReg()
        self.backbone.eval()

    def train(self, mode: bool = True) -> "SelfAlign":
        super().train(mode)
        self.backbone.train(mode and self.cfg.frozen_backbone_dropout)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What Adam updates: everything but the frozen backbone."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- encoders ---------------------------------------------------------------------------------
    def encode_images(self, images: ImageInputs) -> Reps:
        feats = images.img_feats.float()  # [N, R, D_in + 6]
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < images.lengths[:, None]  # [N, R]
        out = self.image(feats, mask)
        views = out["views"]  # [N, k, D]
        extra = torch.cat([0.5 * masked_mean(out["ctx_tokens"], mask), 0.5 * out["ctx"]], dim=-1)  # [N, 2D]
        out["vectors"] = torch.cat([views, extra[:, None].expand(-1, views.shape[1], -1)], dim=-1)
        return out if self.training else {"vectors": out["vectors"]}

    def encode_texts(self, texts: TextInputs) -> Reps:
        texts = fixed_width(texts, self.cfg.max_words)
        with torch.no_grad():
            hidden = self.backbone.forward_text(texts.input_ids, texts.attention_mask)  # [N, L, H]
        valid = texts.attention_mask.bool()
        out = self.text(hidden, valid)
        local_mean = masked_mean(out["ctx_tokens"], out.get("ctx_tokens_mask"))  # padding included (quirk)
        out["lengths"] = texts.lengths
        out["base_vector"] = out["vector"]
        out["vector"] = torch.cat([out["vector"], out["ctx"], local_mean], dim=-1)  # [N, 3D]
        return out if self.training else {"vector": out["vector"]}

    # ---- score ------------------------------------------------------------------------------------
    def score(self, img: Reps, txt: Reps, chunk_size: int | None = None) -> Tensor:
        """s(I, T) = max_k <e_I^(k), e_T>, `[Ni, Nt]`."""
        vi, vt = img["vectors"], txt["vector"]  # [Ni, k, 3D], [Nt, 3D]
        step_i = chunk_size or max(1, vi.shape[0])
        step_t = chunk_size or max(1, vt.shape[0])
        rows = []
        for i in range(0, vi.shape[0], step_i):
            a = vi[i: i + step_i]
            rows.append(torch.cat([torch.einsum("nkd,md->nmk", a, vt[j: j + step_t]).amax(dim=-1)
                                   for j in range(0, vt.shape[0], step_t)], dim=1))
        return torch.cat(rows) if rows else vi.new_zeros(0, vt.shape[0])

    # ---- losses -----------------------------------------------------------------------------------
    def losses(self, img: Reps, txt: Reps, epoch: int) -> dict[str, Tensor]:
        """{"rank", "diversity" (camera only), "concept", "context"}, unweighted (weights: cfg.loss_weights())."""
        if "shallow" not in img or "shallow" not in txt:
            raise ValueError("SelfAlign.losses needs representations encoded in training mode")
        cfg = self.cfg
        terms = {"rank": hinge_triplet(self.score(img, txt), cfg.margin, max_violation=True)}
        if "summary" in img:
            terms["diversity"] = self.diversity(img["summary"], img["shallow_mask"])
        terms["concept"] = self.concept(img["shallow"], img["shallow_mask"], txt["shallow"], txt["lengths"],
                                        freeze=epoch < cfg.prototype_freeze_epochs)
        v2t = self.context_v2t(txt["guide"], img["ctx_tokens"], img["ctx_tokens_mask"])
        t2v = self.context_t2v(img["guide"], txt["ctx_tokens"], txt.get("ctx_tokens_mask"))
        terms["context"] = 0.5 * v2t + 0.5 * t2v
        return terms


def fixed_width(texts: TextInputs, width: int) -> TextInputs:
    """Captions at exactly `width` positions, as CAMERA's loader pads them: longer ones keep their first
    width - 1 pieces and end on their own [SEP]; shorter ones are zero-padded. The width matters because
    the text mean runs over padding (quirk)."""
    ids, mask, lengths = texts.input_ids, texts.attention_mask, texts.lengths
    have = ids.shape[1]
    if have < width:
        ids, mask = F.pad(ids, (0, width - have)), F.pad(mask, (0, width - have))
    elif have > width:
        sep = ids.gather(1, (lengths - 1).clamp_min(0)[:, None])  # [N, 1]
        long = lengths > width
        ids, mask = ids[:, :width].clone(), mask[:, :width]
        ids[long, width - 1] = sep[long, 0]
        lengths = lengths.clamp_max(width)
    return TextInputs(ids, mask, lengths)


def build(cfg: SelfAlignConfig, backbone_dir, img_feature_dim: int, seed: int) -> SelfAlign:
    """The recipe on the backbone folder `backbone_dir` (frozen), new weights drawn from `seed` without
    touching the global RNG."""
    with torch.random.fork_rng(devices=[]):  # the backbone's throw-away default init draws too
        backbone = load_backbone(backbone_dir)
        torch.manual_seed(seed)
        return SelfAlign(cfg, backbone, img_feature_dim)

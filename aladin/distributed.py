"""Data-parallel training under `torchrun`: the process group, in-batch negatives across ranks, gradients.

    torchrun --nproc_per_node 4 -m stages.train_alignment ...   # 4 GPUs, global batch = train_alignment.batch_size

`batch_size` stays the GLOBAL batch (the original's 32 pairs). Every rank encodes its contiguous slice of
each global batch (`aladin.pairs.PairBatches`), then gathers every rank's tokens and embeddings WITH their
gradient (`gather_rows`, as open_clip's `gather_features(..., gather_with_grad=True)`), so that every rank
holds the global B x B score matrices and computes the same global loss L (the negatives of a pair are the
other B - 1 pairs of the global batch, exactly as in one process).

Why averaging the gradients then gives the single-process gradient. Let theta be the shared weights and
x_r = f(theta; batch slice r) the rows rank r computes. Every rank evaluates the same L(x_1, ..., x_W).
On rank r autograd reaches theta only through x_r (the other ranks' rows arrive as constants), and the
backward of the gather sums, over all W ranks, the gradient each rank's copy of L sends to x_r:

    g_r = sum_q dL/dx_r . dx_r/dtheta = W . dL/dx_r . dx_r/dtheta

Averaging over ranks: (1/W) sum_r g_r = sum_r dL/dx_r . dx_r/dtheta = dL/dtheta, the gradient of the global
loss that one process holding the whole batch computes. `average_gradients` does that average with an
explicit all-reduce after backward (no DDP wrapper: the model is called through several methods, not one
`forward`), so gradient clipping and Adam then see exactly the single-process gradient on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .io import PipelineError

BUCKET_BYTES = 32 * 2**20  # gradients are all-reduced in flat buckets of about this size


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes DVCLive, the best model and the resume state."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` = cuda when available, else cpu; under torchrun each process takes GPU `local_rank`."""
    if name not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda, but no CUDA device is available")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = resolve_device(device, local_rank)
    if world_size > 1:
        if where.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise PipelineError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
            torch.cuda.set_device(where)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if where.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank, where)


def close(d: Distributed) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Distributed) -> None:
    if d.active:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------
# Gathering with gradient


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum, over ranks, of the gradients of its own rows.

    The maths of torch.distributed.nn.functional.all_gather (deprecated in torch 2.x) written out: the
    backward all-reduces the gradient of the whole gathered tensor and keeps this rank's block.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # (n, ...) -> (W * n, ...)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        ctx.rows = x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks of dL_q / d(gathered)
        start = dist.get_rank() * ctx.rows
        return grad[start: start + ctx.rows]


def _gather_shapes(x: torch.Tensor, d: Distributed) -> torch.Tensor:
    shape = torch.tensor(x.shape, dtype=torch.int64, device=d.device)  # (ndim,)
    shapes = [torch.empty_like(shape) for _ in range(d.world_size)]
    dist.all_gather(shapes, shape)
    return torch.stack(shapes).cpu()  # (W, ndim)


def gather_rows(x: torch.Tensor, d: Distributed) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order; gradients flow back to this rank's rows.

    Ranks may hold different numbers of rows and different widths on the other dims (alignment token sets
    are cut to each slice's longest item): every dim is zero-padded to the largest across ranks before the
    gather (zeros = False for bool masks), and the padding rows are dropped after it. One process: `x`.
    """
    if not d.active:
        return x
    shapes = _gather_shapes(x, d)  # (W, ndim)
    top = shapes.max(dim=0).values.tolist()
    pad = []
    for dim in reversed(range(1, x.dim())):
        pad += [0, top[dim] - x.shape[dim]]
    pad += [0, top[0] - x.shape[0]]
    is_bool = x.dtype == torch.bool
    padded = F.pad(x.to(torch.uint8) if is_bool else x, pad)  # (max n, max widths...)
    if padded.requires_grad:
        gathered = _GatherWithGrad.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(d.world_size)]
        dist.all_gather(parts, padded.contiguous())
        gathered = torch.cat(parts)
    rows = [gathered[r * top[0]: r * top[0] + int(shapes[r, 0])] for r in range(d.world_size)]
    out = torch.cat(rows)  # (sum n, max widths...)
    return out.bool() if is_bool else out


# ---------------------------------------------------------------------------------------------------
# Parameters and gradients


def broadcast_parameters(module: torch.nn.Module, d: Distributed) -> None:
    """Copy rank 0's parameters and buffers to every rank (they are seeded alike; this makes it certain)."""
    if not d.active:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], d: Distributed) -> None:
    """Replace every gradient by its mean over ranks (see the module docstring for why this is exact).

    Gradients are flattened into buckets of about BUCKET_BYTES per dtype, so a BERT-base backbone takes a
    handful of all-reduces instead of ~200. Every rank runs the same recipe, so the same parameters have
    gradients everywhere.
    """
    if not d.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        last = i == len(grads) - 1
        if last or size >= BUCKET_BYTES or grads[i + 1].dtype != g.dtype:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= d.world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset: offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def gather_tensors(x: torch.Tensor, d: Distributed) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (no gradient), e.g. each rank's RNG state for a checkpoint."""
    if not d.active:
        return [x]
    x = x.to(d.device).contiguous()
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    dist.all_gather(parts, x)
    return [p.cpu() for p in parts]


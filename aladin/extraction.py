"""Region-feature extraction at scale: decoding workers, batched inference, shards, resume and merge.

The dataset order (train, val, test of `dataset_coco.json`) is cut into global batches of
`features.batch_size` consecutive images. A batch is the unit of work everywhere, because a batch's
features depend on its members (zero padding to the largest image, batch-size-dependent kernel
reductions; VINVL.md 8 P10): rank r of W takes global batches r, r + W, r + 2W, ... (image by image
when batch_size is 1), a resumed run recomputes a batch whole and writes only its missing rows, so
every layout of the work produces the same bits as one uninterrupted process.

Each rank appends to its own shard folder, `<out>.shards/rank-00r/`:
    shard.json                      what the rows were computed with; a mismatch discards the shard
    features.tsv + .lineidx         rows as in VINVL.md 6.3, appended one complete line per image
    predictions.tsv + .lineidx      rows as in VINVL.md 6.5, same order
    failures.jsonl                  {"image_id", "file", "message"} per image that could not be read
`merge_shards` copies the rows into one file set in dataset order (the layout of
`features.write_region_files`, plus `failures.json` when an image failed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aladin import data
from aladin.config import Params
from aladin.features import REGION_SOURCES, build_region_model, dataset_records, region_rows
from aladin.io import PipelineError, atomic_path, dumps_json, write_json
from aladin.tsv import FORBIDDEN, lineidx_path

TSV_NAMES = ("features.tsv", "predictions.tsv")
MANIFEST = "shard.json"
FAILURES = "failures.jsonl"
MERGED_FAILURES = "failures.json"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ON_ERROR = ("fail", "record")
SCAN_CHUNK = 1 << 24  # bytes read at a time when recovering a shard's row offsets


# ---------------------------------------------------------------------------------------------------
# The plan: which images, in which batches


@dataclass
class Plan:
    """The dataset's images in order, their boxes, and the global batches (lists of record indices)."""

    records: list[data.ImageRecord]
    instances: dict[int, list[data.Box]]
    batches: list[list[int]]

    @property
    def image_order(self) -> list[int]:
        return [r.image_id for r in self.records]


def plan_dataset(dataset_dir: str | Path, params: Params) -> Plan:
    """Read the data stage's output, check every image up front (`features.dataset_records`), cut batches."""
    cfg = params.features
    records, instances = dataset_records(dataset_dir, cfg)
    size = cfg.batch_size
    batches = [list(range(s, min(s + size, len(records)))) for s in range(0, len(records), size)]
    return Plan(records, instances, batches)


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): explicit values, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    def from_env(name: str, default: int) -> int:
        text = os.environ.get(name)
        if text is None or text == "":
            return default
        if not text.isdigit():
            raise PipelineError(f"environment variable {name}={text!r} is not a non-negative integer")
        return int(text)

    rank = from_env("RANK", 0) if rank is None else rank
    world_size = from_env("WORLD_SIZE", 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} with world size {world_size}: need world size >= 1 and "
                            f"0 <= rank < world size")
    return rank, world_size


def shard_root(out_dir: str | Path) -> Path:
    """`data/features` -> `data/features.shards` (beside the output, so renames stay on one file system)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.shards"


def shard_dir(out_dir: str | Path, rank: int) -> Path:
    return shard_root(out_dir) / f"rank-{rank:03d}"


def settings_of(params: Params, device: str, precision: str, world_size: int) -> dict:
    """What the bits of a row depend on besides the image: must match for rows of two runs to mix."""
    return {"features": asdict(params.features), "seed": params.seed, "device": torch.device(device).type,
            "precision": precision, "world_size": world_size}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Shard files


def _scan_rows(path: Path) -> tuple[list[int], int]:
    """(row start offsets, length of the complete lines) of a TSV; a last line without newline is ignored."""
    starts, complete, pos = [], 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos  # newline positions
            if len(ends):
                starts.append(complete)
                starts.extend((ends[:-1] + 1).tolist())
                complete = int(ends[-1]) + 1
            pos += len(chunk)
    return starts, complete


def _row_ids(path: Path, starts: Sequence[int]) -> list[str]:
    """The first column (image id) of each row."""
    ids = []
    with open(path, "rb") as f:
        for n, start in enumerate(starts, start=1):
            f.seek(start)
            head = f.read(64)
            if b"\t" not in head:
                raise PipelineError(f"{path}:{n}: no tab in the first 64 bytes; not a row of this writer")
            ids.append(head.split(b"\t", 1)[0].decode("ascii", "replace"))
    return ids


def read_shard_rows(directory: Path) -> tuple[list[str], dict[str, list[int]], dict[str, int]]:
    """(image ids, row offsets per TSV, complete bytes per TSV) of the rows present in BOTH TSVs of a shard.

    Rows are appended features first, so a killed run can leave one more features row than predictions
    rows, or half a line: both are left out here. The TSVs are the truth; .lineidx is derived from them.
    """
    starts, sizes, ids = {}, {}, {}
    for name in TSV_NAMES:
        path = directory / name
        starts[name], sizes[name] = _scan_rows(path) if path.is_file() else ([], 0)
        ids[name] = _row_ids(path, starts[name]) if path.is_file() else []
    n = min(len(v) for v in ids.values())
    a, b = ids["features.tsv"][:n], ids["predictions.tsv"][:n]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise PipelineError(f"{directory / 'predictions.tsv'}:{i + 1}: image id {y} but features.tsv row "
                                f"{i + 1} is {x}; the shard is corrupt, delete {directory}")
    for name in TSV_NAMES:
        if n < len(starts[name]):
            sizes[name] = starts[name][n]
        starts[name] = starts[name][:n]
    return a, starts, sizes


def read_failures(directory: Path) -> list[dict]:
    """The failure records of a shard; an unfinished last line (killed mid-write) is ignored."""
    path = directory / FAILURES
    if not path.is_file():
        return []
    out = []
    raw = path.read_bytes()
    for n, line in enumerate(raw.split(b"\n")[:-1], start=1):  # the piece after the last newline is unfinished
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not {"image_id", "file", "message"} <= rec.keys():
            raise PipelineError(f"{path}:{n}: expected an object with image_id, file and message")
        out.append(rec)
    return out


class ShardWriter:
    """Append-only writer of one shard; opening it recovers what an earlier (possibly killed) run left.

    `done` holds the image ids whose rows are complete in both TSVs. Failure records are not kept
    across runs: a failed image is retried, and recorded again if it still fails.
    """

    def __init__(self, directory: str | Path, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self.discarded_stale = False
        self._files: dict[str, object] = {}

    def __enter__(self) -> "ShardWriter":
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST
        old = None
        if manifest_path.is_file():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                old = json.loads(manifest_path.read_text())
        if old != self.manifest:
            # Rows computed with other settings or for other images must not mix with new ones.
            self.discarded_stale = any(self.directory.iterdir())
            for name in (*TSV_NAMES, *(lineidx_path(n).name for n in TSV_NAMES), FAILURES, MANIFEST):
                (self.directory / name).unlink(missing_ok=True)
            write_json(manifest_path, self.manifest)
        ids, starts, sizes = read_shard_rows(self.directory)
        for name in TSV_NAMES:
            path = self.directory / name
            with open(path, "ab") as f:
                f.truncate(sizes[name])  # drops a half-written last line and an unmatched features row
            with atomic_path(lineidx_path(path)) as tmp:
                tmp.write_bytes("".join(f"{s}\n" for s in starts[name]).encode("ascii"))
            self._files[name] = open(path, "ab")
            self._files[lineidx_path(path).name] = open(lineidx_path(path), "ab")
        self._offsets = dict(sizes)
        self._files[FAILURES] = open(self.directory / FAILURES, "wb")
        self.done: set[int] = set()
        for n, key in enumerate(ids, start=1):
            if not key.lstrip("-").isdigit() or int(key) in self.done:
                raise PipelineError(f"{self.directory / 'features.tsv'}:{n}: image id {key!r} is not an integer "
                                    f"or appears twice; delete {self.directory}")
            self.done.add(int(key))
        self.resumed = len(self.done)
        return self

    def append(self, regions) -> None:
        """One image's rows: features, then predictions, then their offsets (see `read_shard_rows`)."""
        for name, columns in zip(TSV_NAMES, region_rows(regions)):
            for j, col in enumerate(columns):
                bad = [c for c in FORBIDDEN if c in col]
                if bad:
                    raise PipelineError(f"image id {regions.image_id}: {name} column {j + 1} contains {bad[0]!r}")
            line = ("\t".join(columns) + "\n").encode("utf-8")
            self._files[name].write(line)
            self._files[lineidx_path(name).name].write(f"{self._offsets[name]}\n".encode("ascii"))
            self._offsets[name] += len(line)
        self.done.add(regions.image_id)

    def record_failure(self, record: dict) -> None:
        self._files[FAILURES].write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def __exit__(self, *exc_info) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


# ---------------------------------------------------------------------------------------------------
# Decoding in worker processes


class BatchImages(Dataset):
    """Item i = global batch i of one rank, decoded: [(record, RGB image or None, error message or None)].

    Workers never raise for a bad image: the message travels back, so the main process applies the
    error policy and the record names the file (a worker exception would arrive as a multi-line trace).
    """

    def __init__(self, dataset_dir: str | Path, batches: Sequence[Sequence[data.ImageRecord]]):
        self.dataset_dir = dataset_dir
        self.batches = [list(b) for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list:
        out = []
        for record in self.batches[i]:
            try:
                out.append((record, data.load_image(self.dataset_dir, record), None))
            except PipelineError as e:
                out.append((record, None, str(e)))
        return out


def _as_is(item):
    return item


def batch_loader(dataset_dir: str | Path, batches: Sequence[Sequence[data.ImageRecord]],
                 num_workers: int = 0) -> DataLoader:
    """Decoded batches in order; with workers, up to 2 batches per worker are decoded ahead."""
    if num_workers < 0:
        raise PipelineError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(BatchImages(dataset_dir, batches), batch_size=None, shuffle=False,
                      num_workers=num_workers, collate_fn=_as_is)


# ---------------------------------------------------------------------------------------------------
# Extraction of one shard


def numerics(device: torch.device, precision: str):
    """The autocast context of `precision`; fp32 is the parity mode and also turns TF32 off (VINVL.md 8 P11)."""
    if precision not in PRECISIONS:
        raise PipelineError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise PipelineError(f"device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"device {device!r} requested but torch.cuda.is_available() is False")
        if dev.index is None:  # torchrun: one GPU per local rank
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return dev


@dataclass
class Outcome:
    """What a run did: rows written now, rows found from an earlier run, images that could not be read."""

    images: int = 0  # images this run was responsible for
    written: int = 0  # rows in the output (a shard: rows added by this run)
    resumed: int = 0  # rows a shard already held from an earlier run
    failures: list[dict] = field(default_factory=list)  # {"image_id", "file", "message"}, dataset order
    discarded_stale: bool = False  # a shard of other settings was deleted first


def extract_shard(dataset_dir: str | Path, directory: str | Path, params: Params, *, rank: int = 0,
                  world_size: int = 1, num_workers: int = 0, device: str = "cpu", precision: str = "fp32",
                  on_error: str = "fail", on_batch: Callable[[int, int], None] | None = None,
                  plan: Plan | None = None, model: nn.Module | None = None) -> Outcome:
    """Rows of this rank's batches appended to the shard `directory`, skipping images it already holds.

    `on_error`: "fail" raises the first unreadable image's PipelineError (rows of earlier batches stay
    for a resume); "record" writes it to failures.jsonl and goes on. `on_batch(handled, total)` is
    called once before the first batch and after each one. `model` defaults to `build_region_model`.
    """
    if on_error not in ON_ERROR:
        raise PipelineError(f"on_error {on_error!r} is not one of {list(ON_ERROR)}")
    plan = plan or plan_dataset(dataset_dir, params)
    cfg = params.features
    dev = resolve_device(device)
    autocast = numerics(dev, precision)
    mine = [[plan.records[i] for i in batch] for batch in plan.batches[rank::world_size]]
    ids = [r.image_id for batch in mine for r in batch]
    boxes = {i: [asdict(b) for b in plan.instances.get(i, [])] for i in ids}  # none needed in detect mode
    manifest = {"rank": rank, "settings": _digest(settings_of(params, device, precision, world_size)),
                "images": _digest([[r.image_id, r.file_name] for b in mine for r in b]), "boxes": _digest(boxes)}
    regions_of = REGION_SOURCES[cfg.mode]
    outcome = Outcome(images=len(ids))
    with ShardWriter(directory, manifest) as shard:
        outcome.resumed, outcome.discarded_stale = shard.resumed, shard.discarded_stale
        if not shard.done <= set(ids):
            raise PipelineError(f"{directory}: holds image ids that are not this rank's; delete it")
        todo = [batch for batch in mine if any(r.image_id not in shard.done for r in batch)]
        handled = len(ids) - sum(len(b) for b in todo)
        if on_batch is not None:
            on_batch(handled, len(ids))
        if todo and model is None:
            model = build_region_model(cfg, params.seed)
        if model is not None:
            model = model.to(dev)
        with autocast, torch.inference_mode():
            for batch in batch_loader(dataset_dir, todo, num_workers):
                loaded = []
                for record, image, error in batch:
                    if error is None:
                        loaded.append((record, image))
                        continue
                    if on_error == "fail":
                        raise PipelineError(f"{error} (image id {record.image_id}; {shard.resumed + outcome.written}"
                                            f" images done are kept in {directory} for a rerun to resume)")
                    failure = {"image_id": record.image_id, "file": record.file_name, "message": error}
                    shard.record_failure(failure)
                    outcome.failures.append(failure)
                if any(r.image_id not in shard.done for r, _ in loaded):
                    # The whole batch, done members included: the missing rows then get the same bits.
                    for regions in regions_of(model, [r for r, _ in loaded], [im for _, im in loaded],
                                              plan.instances):
                        if regions.image_id not in shard.done:
                            shard.append(regions.sorted_by_conf() if cfg.sort_by_conf else regions)
                            outcome.written += 1
                shard.flush()
                handled += len(batch)
                if on_batch is not None:
                    on_batch(handled, len(ids))
    return outcome


# ---------------------------------------------------------------------------------------------------
# Merge


def merge_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path, image_order: Sequence[int]) -> Outcome:
    """One file set at `out_dir` in `image_order` from the shards' rows; raw lines are copied unchanged.

    Every image must have a row in exactly one shard or a failure record; `failures.json` (dataset
    order) is written only when some image failed. The folder appears whole or not at all.
    """
    shard_dirs = [Path(d) for d in shard_dirs]
    if not shard_dirs:
        raise PipelineError(f"no shards to merge into {out_dir}")
    _check_manifests(shard_dirs)
    where: dict[int, tuple[int, int]] = {}  # image id -> (shard, row)
    rows = []
    failed: dict[int, dict] = {}
    for s, directory in enumerate(shard_dirs):
        ids, starts, sizes = read_shard_rows(directory)
        rows.append((starts, sizes))
        for row, key in enumerate(ids):
            image_id = int(key)
            if image_id in where:
                other = shard_dirs[where[image_id][0]]
                raise PipelineError(f"image id {image_id} has rows in both {other} and {directory}")
            where[image_id] = (s, row)
        for rec in read_failures(directory):
            failed.setdefault(rec["image_id"], rec)
    order = set(image_order)
    extra = sorted(set(where) - order)
    if extra:
        raise PipelineError(f"shards hold image ids not in the dataset: {_first(extra)}; delete {shard_dirs[0].parent}")
    missing = [i for i in image_order if i not in where and i not in failed]
    if missing:
        raise PipelineError(f"{len(missing)} images have no row in any shard under {shard_dirs[0].parent} "
                            f"({_first(missing)}): a rank has not finished; rerun it")
    failures = [failed[i] for i in image_order if i not in where]
    kept = [i for i in image_order if i in where]
    index = {str(image_id): row for row, image_id in enumerate(kept)}
    with atomic_path(out_dir, directory=True) as tmp:
        for name in TSV_NAMES:
            readers = [open(d / name, "rb") for d in shard_dirs]
            try:
                with open(tmp / name, "wb") as out, open(lineidx_path(tmp / name), "wb") as idx:
                    offset = 0
                    for image_id in kept:
                        s, row = where[image_id]
                        starts, sizes = rows[s]
                        end = starts[name][row + 1] if row + 1 < len(starts[name]) else sizes[name]
                        readers[s].seek(starts[name][row])
                        line = readers[s].read(end - starts[name][row])
                        idx.write(f"{offset}\n".encode("ascii"))
                        out.write(line)
                        offset += len(line)
            finally:
                for r in readers:
                    r.close()
        write_json(tmp / "imageid2idx.json", index)
        if failures:
            (tmp / MERGED_FAILURES).write_text(dumps_json(failures))
    return Outcome(images=len(image_order), written=len(index), failures=failures)


def _first(ids: Sequence, n: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:n])
    return f"image ids {shown}" + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _check_manifests(shard_dirs: Sequence[Path]) -> None:
    """All shards of one run: same settings and world size, every rank present once."""
    manifests = []
    for d in shard_dirs:
        path = d / MANIFEST
        try:
            manifests.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise PipelineError(f"{path}: file not found; {d} is not a shard") from None
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    settings = {m.get("settings") for m in manifests}
    if len(settings) != 1:
        raise PipelineError(f"shards under {shard_dirs[0].parent} were computed with different settings "
                            f"(params, device, precision or world size); rerun the ranks")
    ranks = sorted(m.get("rank") for m in manifests)
    if ranks != list(range(len(shard_dirs))):
        raise PipelineError(f"shards under {shard_dirs[0].parent} have ranks {ranks}, expected 0..{len(shard_dirs) - 1}")


# ---------------------------------------------------------------------------------------------------
# Single process, start to end


def extract_dataset(dataset_dir: str | Path, out_dir: str | Path, params: Params,
                    on_batch: Callable[[int, int], None] | None = None, *, num_workers: int = 0,
                    device: str = "cpu", precision: str = "fp32", on_error: str = "fail",
                    plan: Plan | None = None) -> Outcome:
    """Every image into one file set at `out_dir` through a one-rank shard, which is deleted after the merge.

    A killed or failed run leaves the shard at `shard_dir(out_dir, 0)`; the next call resumes it.
    """
    plan = plan or plan_dataset(dataset_dir, params)
    directory = shard_dir(out_dir, 0)
    shard = extract_shard(dataset_dir, directory, params, num_workers=num_workers, device=device,
                          precision=precision, on_error=on_error, on_batch=on_batch, plan=plan)
    merged = merge_shards([directory], out_dir, plan.image_order)
    shutil.rmtree(shard_root(out_dir))
    merged.resumed, merged.discarded_stale = shard.resumed, shard.discarded_stale
    return merged

"""Resumable, checksummed downloads and safe archive extraction for the paper profile's inputs.

Why not `dvc import-url`: it cannot resume a multi-GB download and may fetch again on `dvc update`
(DVC_AND_NOTEBOOKS.md section 2.9, treeverse/dvc#1549, #8751). A download stage built on this module streams
into `<dest>/.<name>.part`, resumes with an HTTP `Range` request after a dropped connection, checks size and
SHA-256, and only then renames onto `<dest>/<name>`; a killed run leaves at most the `.part` file, which the
next run resumes.

`PAPER_FILES` lists the public locations known from the specs. No SHA-256 of those files is given there, so
each entry has `sha256=""` and `download()` refuses it unless the caller passes `allow_unverified=True`;
the integrator pins real checksums once the files have been fetched and inspected.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from aladin.io import PipelineError, atomic_path


@dataclass(frozen=True)
class RemoteFile:
    """One file and its mirrors, tried in order. `name` is the file name under the destination folder."""

    name: str
    urls: tuple[str, ...]
    sha256: str  # lower-case hex; "" = not known, refused unless allow_unverified
    size: int | None  # bytes; None = not known
    extract: bool = False  # an archive that fetch() unpacks after download


# ---------------------------------------------------------------------------------------------------
# Catalogue (paper profile)

_COCO = "http://images.cocodataset.org"
# VINVL.md 3.1: the SGB README / pzzhang/VinVL DOWNLOAD.md blob first, then the MMF re-host of the same file.
_VINVL_BLOB = "https://penzhanwu2.blob.core.windows.net/sgg/sgg_benchmark/vinvl_model_zoo"
_VINVL_MMF = "https://dl.fbaipublicfiles.com/mmf/data/models/vinvl/detection"
# ALADIN.md 1.2 names coco_ir/base/checkpoint-0132780; the folder URL is VinVL_MODEL_ZOO.md's (and the mesnico/
# ALADIN README's azcopy line). Oscar's DOWNLOAD.md (2023) says biglmdiag now needs a read-only SAS query string
# appended, and ALADIN.md 6.7 reports the folder missing (microsoft/Oscar#95, #75): add a working mirror with
# dataclasses.replace(f, urls=(...,) + f.urls). File names are what Oscar's checkpoint saving writes
# (save_pretrained of the model and the tokenizer) [derived, not listed in the specs].
_COCO_IR = "https://biglmdiag.blob.core.windows.net/vinvl/model_ckpts/coco_ir/base/checkpoint-0132780"

PAPER_FILES: dict[str, RemoteFile] = {
    "coco_train2014": RemoteFile("train2014.zip", (f"{_COCO}/zips/train2014.zip",), "", None, extract=True),
    "coco_val2014": RemoteFile("val2014.zip", (f"{_COCO}/zips/val2014.zip",), "", None, extract=True),
    "coco_annotations2014": RemoteFile(
        "annotations_trainval2014.zip", (f"{_COCO}/annotations/annotations_trainval2014.zip",), "", None,
        extract=True,
    ),
    "karpathy_split": RemoteFile(
        "caption_datasets.zip", ("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",),
        "", None, extract=True,
    ),
    "vinvl_detector": RemoteFile(
        "vinvl_vg_x152c4.pth", (f"{_VINVL_BLOB}/vinvl_vg_x152c4.pth", f"{_VINVL_MMF}/vinvl_vg_x152c4.pth"), "", None,
    ),
    "vinvl_labelmap": RemoteFile(
        "VG-SGG-dicts-vgoi6-clipped.json", (f"{_VINVL_BLOB}/VG-SGG-dicts-vgoi6-clipped.json",), "", None,
    ),
    "vinvl_coco_ir_config": RemoteFile("config.json", (f"{_COCO_IR}/config.json",), "", None),
    "vinvl_coco_ir_weights": RemoteFile("pytorch_model.bin", (f"{_COCO_IR}/pytorch_model.bin",), "", None),
    "vinvl_coco_ir_vocab": RemoteFile("vocab.txt", (f"{_COCO_IR}/vocab.txt",), "", None),
}


# ---------------------------------------------------------------------------------------------------
# Download


class _Transient(Exception):
    """A failure worth retrying on the same mirror (dropped connection, timeout, 5xx)."""


class _NextMirror(Exception):
    """A failure that retrying this mirror will not fix (404, bad checksum of a complete download)."""


def sha256_of(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def download(
    remote: RemoteFile,
    dest_dir: str | Path,
    *,
    retries: int = 3,
    timeout: float = 60,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    backoff: float = 2.0,
    allow_unverified: bool = False,
) -> Path:
    """Fetch `remote` into `dest_dir/remote.name` and return that path.

    Each mirror gets `retries` attempts, sleeping `backoff * 2**k` seconds after the k-th failure; every
    attempt resumes the `.part` file with a `Range` request. Raises `PipelineError` naming the file, each URL
    with its failure, and where to put the file by hand.
    """
    _check_remote(remote, allow_unverified)
    dest_dir = Path(dest_dir)
    final = dest_dir / remote.name
    if final.is_file() and _is_good(final, remote):
        return final  # already there: no request at all
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / f".{remote.name}.part"

    failures: list[str] = []
    for url in remote.urls:
        error = _try_mirror(url, part, remote, retries, timeout, chunk_size, progress, backoff)
        if error is None:
            os.replace(part, final)
            return final
        failures.append(f"  {url}: {error}")
    part.unlink(missing_ok=True)  # after every mirror failed, no partial file is left behind
    expected = f"sha256 {remote.sha256}" if remote.sha256 else "sha256 not known, accepted unverified"
    raise PipelineError(
        f"could not download {remote.name}; tried:\n" + "\n".join(failures)
        + f"\nPlace the file by hand at {final.resolve()} ({expected}) and run again."
    )


def _check_remote(remote: RemoteFile, allow_unverified: bool) -> None:
    if not remote.name or "/" in remote.name or "\\" in remote.name or remote.name in (".", ".."):
        raise PipelineError(f"download: {remote.name!r} is not a plain file name")
    if not remote.urls:
        raise PipelineError(f"download {remote.name}: no URL given")
    for url in remote.urls:
        if not url.startswith(("http://", "https://")):
            raise PipelineError(f"download {remote.name}: {url!r} is not an http(s) URL")
    if remote.sha256 and not re.fullmatch(r"[0-9a-f]{64}", remote.sha256):
        raise PipelineError(f"download {remote.name}: sha256 {remote.sha256!r} is not 64 lower-case hex digits")
    if not remote.sha256 and not allow_unverified:
        raise PipelineError(
            f"download {remote.name}: no sha256 is known for this file, so it cannot be verified; "
            "pin its sha256, or pass allow_unverified=True to accept it unchecked"
        )


def _is_good(path: Path, remote: RemoteFile) -> bool:
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    return not remote.sha256 or sha256_of(path) == remote.sha256


def _try_mirror(url, part, remote, retries, timeout, chunk_size, progress, backoff) -> str | None:
    """Download `url` into `part` until it verifies; return None, or the last failure as text."""
    last = "no attempt made"
    for attempt in range(max(1, retries)):
        resumed_from = part.stat().st_size if part.exists() else 0
        try:
            _fetch(url, part, remote, timeout, chunk_size, progress)
            _verify(part, remote)
            return None
        except _Transient as e:
            last = str(e)
        except _NextMirror as e:
            last = str(e)
            part.unlink(missing_ok=True)
            if resumed_from == 0:
                return last  # this mirror served the whole file and it was wrong
            # The bad bytes may predate this mirror (an older .part): try it once more from zero.
        if attempt + 1 < retries and backoff > 0:
            time.sleep(backoff * 2**attempt)
    return last


def _fetch(url: str, part: Path, remote: RemoteFile, timeout: float, chunk_size: int, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()
        offset = 0
    if remote.size is not None and offset == remote.size:
        return  # complete from an earlier run; _verify decides
    request = urllib.request.Request(url, headers={"User-Agent": "aladin-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:  # Range Not Satisfiable: the part is complete, or longer than the file
            total = _content_range_total(e.headers.get("Content-Range", ""))
            if total is not None and total == offset:
                return
            part.unlink(missing_ok=True)
            raise _Transient(f"HTTP 416 for bytes={offset}-; partial file discarded") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise _NextMirror(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, DNS, timeout
        raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    with response:
        if response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"server answered bytes={offset}- with Content-Range starting at {start}")
            mode = "ab"
        else:  # 200: the server ignored Range, so the body is the whole file
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected_end = offset + int(length) if length and length.isdigit() else remote.size
        received = offset
        bar = tqdm(
            total=expected_end, initial=offset, unit="B", unit_scale=True, desc=remote.name, file=sys.stderr,
            disable=not progress or not sys.stderr.isatty(), leave=False,
        )
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = response.read(chunk_size)
                    except (OSError, ValueError, http.client.HTTPException) as e:  # ValueError: closed socket
                        raise _Transient(f"connection lost after {received} bytes ({type(e).__name__})") from None
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
                    if remote.size is not None and received > remote.size:
                        raise _NextMirror(f"more than the expected {remote.size} bytes")
        finally:
            bar.close()
    if expected_end is not None and received < expected_end:
        # http.client returns b"" when the peer closes early; the byte count is the only sign.
        raise _Transient(f"connection closed after {received} of {expected_end} bytes")


def _verify(part: Path, remote: RemoteFile) -> None:
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        raise _NextMirror(f"size mismatch: got {size} bytes, expected {remote.size}")
    if remote.sha256:
        got = sha256_of(part)
        if got != remote.sha256:
            raise _NextMirror(f"sha256 mismatch: got {got}, expected {remote.sha256}")


def _content_range_start(value: str) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
    return int(m.group(1)) if m else None


def _content_range_total(value: str) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)\s*", value)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------
# Safe extraction


def extract(archive: str | Path, dest_dir: str | Path) -> Path:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) archive into `dest_dir` and return `dest_dir`.

    Refuses, naming the archive and the member: absolute paths, paths escaping through `..`, symlinks and
    hard links whose target lies outside, and device files or FIFOs. The archive is unpacked into a temporary
    folder beside `dest_dir` and renamed onto it (replacing an existing `dest_dir`), so a refused or
    interrupted extraction leaves nothing behind.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise PipelineError(f"{archive}: archive not found")
    if zipfile.is_zipfile(archive):
        unpack = _extract_zip
    elif tarfile.is_tarfile(archive):
        unpack = _extract_tar
    else:
        raise PipelineError(f"{archive}: neither a zip nor a tar archive")
    with atomic_path(dest_dir, directory=True) as tmp:
        unpack(archive, Path(tmp))
    return dest_dir


def fetch(remote: RemoteFile, dest_dir: str | Path, **download_kwargs) -> Path:
    """download(), then for an `extract` archive unpack it into `dest_dir/<name without suffix>` once."""
    path = download(remote, dest_dir, **download_kwargs)
    if not remote.extract:
        return path
    target = Path(dest_dir) / re.sub(r"(\.tar)?\.(zip|tar|gz|tgz|bz2|xz)$", "", remote.name)
    if target.is_dir():
        return target  # extraction is atomic, so an existing folder is complete
    return extract(path, target)


def _refuse(archive: Path, member: str, why: str) -> PipelineError:
    return PipelineError(f"{archive}: refusing member {member!r}: {why}")


def _lexical_target(root: Path, name: str) -> Path | None:
    """`root/name` normalised without touching the disk, or None when it is absolute or escapes `root`."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return None
    target = Path(os.path.normpath(root / name))
    return target if target == root or root in target.parents else None


def _link_escapes(root: Path, member_path: Path, link: str) -> bool:
    """A symlink's target is relative to the link's own folder; absolute targets are refused outright."""
    if os.path.isabs(link) or re.match(r"^[A-Za-z]:", link):
        return True
    target = Path(os.path.normpath(member_path.parent / link))
    return not (target == root or root in target.parents)


def _check_inside(archive: Path, root: Path, member: str, path: Path, what: str) -> None:
    """Resolve symlinks already extracted (a link to `.` followed by `..` is not caught lexically)."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise _refuse(archive, member, f"{what} resolves outside the destination")


def _check_name(archive: Path, root: Path, name: str) -> Path:
    target = _lexical_target(root, name)
    if target is None:
        raise _refuse(archive, name, "absolute path or path outside the destination")
    return target


def _extract_zip(archive: Path, tmp: Path) -> None:
    root = Path(os.path.realpath(tmp))
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # check everything before writing anything
            _check_name(archive, root, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise _refuse(archive, info.filename, "device file, FIFO or socket")
            if stat.S_ISLNK(mode):
                link = zf.read(info).decode("utf-8", "replace")
                target = _check_name(archive, root, info.filename)
                if _link_escapes(root, target, link):
                    raise _refuse(archive, info.filename, f"symlink to {link!r} points outside the destination")
        for info in infos:
            target = _check_name(archive, root, info.filename)
            _check_inside(archive, root, info.filename, target.parent, "its folder")
            mode = info.external_attr >> 16
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif stat.S_ISLNK(mode):
                link = zf.read(info).decode("utf-8", "replace")
                _check_inside(archive, root, info.filename, target.parent / link, f"symlink to {link!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(link, target)
            else:
                _check_inside(archive, root, info.filename, target, "the path")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _extract_tar(archive: Path, tmp: Path) -> None:
    root = Path(os.path.realpath(tmp))
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:  # check everything before writing anything
                target = _check_name(archive, root, m.name)
                if m.isdev():
                    raise _refuse(archive, m.name, "device file or FIFO")
                if m.issym():
                    if _link_escapes(root, target, m.linkname):
                        raise _refuse(archive, m.name, f"symlink to {m.linkname!r} points outside the destination")
                if m.islnk() and _lexical_target(root, m.linkname) is None:  # hard links name a member path
                    raise _refuse(archive, m.name, f"hard link to {m.linkname!r} points outside the destination")
            for m in members:
                target = _check_name(archive, root, m.name)
                _check_inside(archive, root, m.name, target.parent, "its folder")
                if m.issym():
                    _check_inside(archive, root, m.name, target.parent / m.linkname, f"symlink to {m.linkname!r}")
                elif m.islnk():
                    _check_inside(archive, root, m.name, root / m.linkname, f"hard link to {m.linkname!r}")
                else:
                    _check_inside(archive, root, m.name, target, "the path")
                # The standard library's "data" filter (PEP 706) re-checks the same rules as a second guard.
                tf.extract(m, root, filter="data")
    except tarfile.FilterError as e:
        raise PipelineError(f"{archive}: refusing member {e.tarinfo.name!r}: {e}") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PipelineError(f"{archive}: cannot extract ({type(e).__name__}: {e})") from None

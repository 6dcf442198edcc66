"""Resumable, checksummed downloads and safe archive extraction for the paper profile's inputs.

Why not `dvc import-url`: it cannot resume a multi-GB download and may fetch again on `dvc update`
(DVC_AND_NOTEBOOKS.md section 2.9, treeverse/dvc#1549, #8751). A download stage built on this module streams
into `<dest>/.<name>.part`, resumes with an HTTP `Range` request after a dropped connection, checks size and
SHA-256, and only then renames onto `<dest>/<name>`; a killed run leaves at most the `.part` file, which the
next run resumes.

The catalogue is the `downloads` section of params.yaml (`aladin.config.DownloadsConfig`): each entry lists
its mirrors, sha256 and size. `fetch_param(downloads, key)` fetches one entry into `downloads.dir` (the files of
a backbone checkpoint into a sub-folder, see `GROUPS`). No sha256 of the upstream files is given in the specs,
so entries start unpinned (`sha256: ''`) and are refused unless `downloads.allow_unverified`; then a warning
names each file with its measured sha256 and size, and

    python -m aladin.download --pin --params params.yaml

prints those values for every catalogue file already in `downloads.dir`, as YAML to paste into params.yaml.

A file's local name is the last path component of its first URL, query string ignored: a mirror that needs
one (Oscar's DOWNLOAD.md, 2023: the biglmdiag blob now wants a read-only SAS token; ALADIN.md 6.7 reports the
coco_ir folder missing, microsoft/Oscar#95, #75) can go first in the entry's `urls` without renaming the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from aladin.config import ConfigError, DownloadsConfig, RemoteFileConfig, load_params
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
# The catalogue in params (`downloads`)

# Entries whose files make one checkpoint folder share a sub-folder of downloads.dir: the two backbones'
# config.json and vocab.txt would otherwise collide, and each sub-folder is then a complete checkpoint
# (also the place to put one by hand). Every other file lies directly in downloads.dir.
GROUPS = {
    "vinvl_backbone_config": "vinvl_backbone",
    "vinvl_backbone_vocab": "vinvl_backbone",
    "vinvl_backbone_weights": "vinvl_backbone",
    "bert_config": "bert-base-uncased",
    "bert_vocab": "bert-base-uncased",
    "bert_weights": "bert-base-uncased",
}


def catalogue_keys(downloads: DownloadsConfig | None = None) -> list[str]:
    """The entry names of the `downloads` section, in declaration order."""
    return [f.name for f in dataclasses.fields(DownloadsConfig)
            if isinstance(getattr(downloads or DownloadsConfig(), f.name), RemoteFileConfig)]


def _entry(downloads: DownloadsConfig, key: str) -> RemoteFileConfig:
    entry = getattr(downloads, key, None)
    if not isinstance(entry, RemoteFileConfig):
        raise PipelineError(f"downloads.{key}: no such catalogue entry (known: {', '.join(catalogue_keys(downloads))})")
    return entry


def file_name(entry: RemoteFileConfig, key: str = "?") -> str:
    """The local file name of an entry: the last path component of its first URL (query string ignored)."""
    if not entry.urls:
        raise PipelineError(f"downloads.{key}: no URL given")
    name = urllib.parse.unquote(urllib.parse.urlsplit(entry.urls[0]).path.rsplit("/", 1)[-1])
    if not name:
        raise PipelineError(f"downloads.{key}: the first URL {entry.urls[0]!r} does not end in a file name")
    return name


def remote_from_config(entry: RemoteFileConfig, key: str = "?", extract: bool = False) -> RemoteFile:
    """`RemoteFile` of a params entry: size 0 means not known, sha256 "" means not pinned."""
    return RemoteFile(file_name(entry, key), tuple(entry.urls), entry.sha256, entry.size or None, extract=extract)


def param_folder(downloads: DownloadsConfig, key: str) -> Path:
    """Where the file of entry `key` is put: downloads.dir, or its `GROUPS` sub-folder."""
    _entry(downloads, key)
    return Path(downloads.dir) / GROUPS[key] if key in GROUPS else Path(downloads.dir)


def param_path(downloads: DownloadsConfig, key: str) -> Path:
    """The path the file of entry `key` has once fetched (before any extraction)."""
    return param_folder(downloads, key) / file_name(_entry(downloads, key), key)


def fetch_param(downloads: DownloadsConfig, key: str, extract: bool = False, **download_kwargs) -> Path:
    """Fetch catalogue entry `key` (and unpack it when `extract`); return the file or the unpacked folder.

    An unpinned entry is refused unless `downloads.allow_unverified`; when accepted, one warning line on
    stderr names it with its measured sha256 and size. `download_kwargs` go to `download()` (progress,
    backoff, chunk_size).
    """
    entry = _entry(downloads, key)
    remote = remote_from_config(entry, key, extract=extract)
    folder = param_folder(downloads, key)
    if not entry.sha256 and not downloads.allow_unverified:
        raise PipelineError(
            f"downloads.{key} ({remote.name}): no sha256 is pinned, so the file cannot be verified; pin "
            f"downloads.{key}.sha256 and size in params.yaml, or set downloads.allow_unverified: true to accept "
            "it unchecked (then `python -m aladin.download --pin` prints the values to pin)")
    options = dict(retries=downloads.retries, timeout=downloads.timeout,
                   allow_unverified=downloads.allow_unverified, remember_sha256=True) | download_kwargs
    try:
        path = fetch(remote, folder, **options)
    except PipelineError as e:
        raise PipelineError(f"downloads.{key}: {e}") from None
    if not entry.sha256:
        archive = folder / remote.name
        print(f"warning: downloads.{key}: {archive} is not pinned and was accepted unverified: sha256 "
              f"{measured_sha256(archive)}, size {archive.stat().st_size} bytes (pin them in params.yaml)",
              file=sys.stderr)
    return path


def measured_sha256(path: str | Path) -> str:
    """sha256 of `path`, remembered in a `.<name>.sha256` file beside it while its size and mtime stay the
    same (hashing the 13 GB image archive on every run would take minutes)."""
    path = Path(path)
    st = path.stat()
    memo = path.parent / f".{path.name}.sha256"
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp and re.fullmatch(r"[0-9a-f]{64}", known.get("sha256", "")):
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_of(path)
    _remember_sha256(path, digest)
    return digest


def _remember_sha256(path: Path, digest: str) -> None:
    st = path.stat()
    try:
        with atomic_path(path.parent / f".{path.name}.sha256") as tmp:
            tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}) + "\n")
    except OSError:
        pass  # a read-only folder: no memo, the value is still right


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
    remember_sha256: bool = False,
) -> Path:
    """Fetch `remote` into `dest_dir/remote.name` and return that path.

    `remember_sha256`: keep the verified checksum in `.<name>.sha256` beside the file, so that a later
    call trusts a file of unchanged size and mtime without hashing it again.

    Each mirror gets `retries` attempts, sleeping `backoff * 2**k` seconds after the k-th failure; every
    attempt resumes the `.part` file with a `Range` request. Raises `PipelineError` naming the file, each URL
    with its failure, and where to put the file by hand.
    """
    _check_remote(remote, allow_unverified)
    dest_dir = Path(dest_dir)
    final = dest_dir / remote.name
    if final.is_file() and _is_good(final, remote, remember_sha256):
        return final  # already there: no request at all
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / f".{remote.name}.part"

    failures: list[str] = []
    for url in remote.urls:
        error = _try_mirror(url, part, remote, retries, timeout, chunk_size, progress, backoff)
        if error is None:
            os.replace(part, final)
            if remote.sha256 and remember_sha256:  # verified just now: later runs need not hash it again
                _remember_sha256(final, remote.sha256)
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


def _is_good(path: Path, remote: RemoteFile, remember: bool) -> bool:
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    if not remote.sha256:
        return True
    return (measured_sha256(path) if remember else sha256_of(path)) == remote.sha256


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
        raise PipelineError(f"{archive}: neither a zip nor a tar archive (truncated or damaged?)")
    with atomic_path(dest_dir, directory=True) as tmp:
        unpack(archive, Path(tmp))
    return dest_dir


def fetch(remote: RemoteFile, dest_dir: str | Path, **download_kwargs) -> Path:
    """download(), then for an `extract` archive unpack it into `dest_dir/<name without suffix>` once.

    The folder is unpacked again when the archive changed since (a `.<folder>.extracted` stamp beside it
    holds the archive's size and mtime); a damaged archive raises PipelineError naming it.
    """
    path = download(remote, dest_dir, **download_kwargs)
    if not remote.extract:
        return path
    target = Path(dest_dir) / re.sub(r"(\.tar)?\.(zip|tar|gz|tgz|bz2|xz)$", "", remote.name)
    stamp_file = Path(dest_dir) / f".{target.name}.extracted"
    st = path.stat()
    stamp = f"{remote.name} {st.st_size} {st.st_mtime_ns}\n"
    if target.is_dir() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target  # extraction is atomic, so an existing folder is complete
    stamp_file.unlink(missing_ok=True)
    try:
        extract(path, target)
    except PipelineError as e:
        raise PipelineError(f"{e}; delete {path} to download it again") from None
    with atomic_path(stamp_file) as tmp:
        tmp.write_text(stamp)
    return target


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
    try:
        _unpack_zip(archive, tmp)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as e:  # CRC, truncation
        raise PipelineError(f"{archive}: cannot extract ({type(e).__name__}: {e})") from None


def _unpack_zip(archive: Path, tmp: Path) -> None:
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


# ---------------------------------------------------------------------------------------------------
# Pinning: python -m aladin.download --pin --params params.yaml


def pin_lines(downloads: DownloadsConfig) -> list[str]:
    """YAML lines (indented as under `downloads:` in params.yaml) giving each catalogue file present in
    downloads.dir its urls, measured sha256 and size. An entry whose pinned sha256 or size differs from
    the file gets a comment saying so."""
    lines = []
    for key in catalogue_keys(downloads):
        entry = _entry(downloads, key)
        if not entry.urls:  # an entry switched off (urls: []) names no file to measure
            continue
        path = param_path(downloads, key)
        if not path.is_file():
            continue
        digest, size = measured_sha256(path), path.stat().st_size
        if (entry.sha256 and entry.sha256 != digest) or (entry.size and entry.size != size):
            lines.append(f"  # {key}: {path} differs from the pinned sha256 {entry.sha256 or '-'} / size "
                         f"{entry.size or '-'}")
        lines.append(f"  {key}:")
        lines.append("    urls:")
        lines.extend(f"    - {url}" for url in entry.urls)
        lines.append(f"    sha256: {digest}")
        lines.append(f"    size: {size}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aladin.download",
        description="Print the sha256 and size of every catalogue file in downloads.dir, to pin in params.yaml.")
    parser.add_argument("--pin", action="store_true", required=True,
                        help="measure the files already downloaded (required; the only action)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        downloads = load_params(args.params).downloads
        lines = pin_lines(downloads)
        if not lines:
            raise PipelineError(f"{downloads.dir}: no file of the downloads catalogue is there yet "
                                f"(known: {', '.join(catalogue_keys(downloads))})")
    except (ConfigError, PipelineError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"# Measured in {downloads.dir}; replace these entries under `downloads:` in {args.params}.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

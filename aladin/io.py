"""Crash-safe output: everything is written under a temporary name in the target's folder and renamed.

A killed stage therefore leaves either the previous output or none, never half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


class PipelineError(Exception):
    """Bad input that stops a stage; the message names the file, line or key. Stages print it alone."""


class WriteError(PipelineError, OSError):
    """An output that could not be written (a full disk, no permission): a `PipelineError` naming the output,
    and still an `OSError`, so callers that tolerate an unwritable optional file keep doing so."""


def error_message(e: BaseException) -> str:
    """The message a stage prints for `e`.

    A DataLoader worker's exception comes back re-raised as `type(e)(text)` where text is "Caught X in
    DataLoader worker process 0.\\nOriginal Traceback ...\\n<module>.X: <message>"; only <message> is kept,
    so a bad row read in a worker reads the same as one read in the main process.
    """
    text = str(e)
    if "\nOriginal Traceback (most recent call last):" not in text:
        return text
    name = f"\n{type(e).__module__}.{type(e).__qualname__}: "
    at = text.rfind(name)
    return text[at + len(name):].rstrip("\n") if at >= 0 else text


def _write_error(path: Path, tmp: Path | None, e: OSError, kept: bool) -> WriteError:
    """One line naming `path`, not the temporary name the failing call saw."""
    what = e.strerror or str(e) or type(e).__name__
    name = e.filename
    if name is not None and tmp is not None:
        name = Path(name)
        if name == tmp:
            name = None
        elif tmp in name.parents:
            name = name.relative_to(tmp)
    detail = f"{what}: {name}" if name is not None else what
    after = "the previous output is kept" if kept else "nothing was written"
    return WriteError(f"{path}: cannot write ({detail}); {after}")


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    With `directory=True` the temporary path is an empty directory and an existing `path` directory is
    replaced as a whole. An `OSError` on the way (ENOSPC, EACCES, ...) becomes a `WriteError` naming `path`;
    `path` then still holds what it held before.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.name}.tmp-"
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise _write_error(path, None, e, path.exists()) from e
    try:
        yield tmp
        if directory:
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)  # put the previous output back before reporting
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, PipelineError):
            raise _write_error(path, tmp, e, path.exists()) from e
        raise


def dumps_json(obj) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_json(obj))


def read_json(path: str | Path):
    """Read JSON, turning a missing or malformed file into a `PipelineError` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

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


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    With `directory=True` the temporary path is an empty directory and an existing `path` directory is
    replaced as a whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
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

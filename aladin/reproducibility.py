"""Which outputs may differ between two runs of the pipeline, and which did.

Two cold `dvc repro` runs of one commit on one machine write the same bytes to every output except those
listed in `.nondeterministic` at the repository root: wall-clock timings, the executed notebook, and what
displays them. A listed path is an output of dvc.yaml or a file inside a directory output; a listed folder
covers everything beneath it. Outputs are compared through the md5s DVC records in dvc.lock; a directory
output whose hash differs is opened file by file, so that one declared file does not excuse its siblings.

    declared = read_nondeterministic(root)
    undeclared(differing_outputs(a / "dvc.lock", b / "dvc.lock", a, b), declared)   # [] when deterministic
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

import yaml

from .io import PipelineError

NONDETERMINISTIC = ".nondeterministic"
# What dvc.lock records of a path's content; everything else in an entry (the path, the algorithm) is fixed.
CONTENT_FIELDS = ("md5", "size", "nfiles")


def _clean(path: str) -> str | None:
    """`path` as a repository-relative POSIX path ('a/b', no './' or trailing '/'), None if it is not one."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or str(p) in ("", "."):
        return None
    return str(p)


def read_nondeterministic(root) -> list[str]:
    """The paths listed in `root/.nondeterministic`, in file order: one per line, `#` starts a comment."""
    path = Path(root) / NONDETERMINISTIC
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    paths = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        clean = _clean(entry)
        if clean is None:
            raise PipelineError(f"{path}:{number}: {entry!r} is not a path inside the repository")
        if clean in paths:
            raise PipelineError(f"{path}:{number}: {clean} is listed twice")
        paths.append(clean)
    return paths


def covers(declared, path: str) -> bool:
    """Whether `path` is declared, or lies inside a declared folder."""
    parts = PurePosixPath(path).parts
    return any(parts[:len(d.parts)] == d.parts for d in map(PurePosixPath, declared))


def undeclared(paths, declared) -> list[str]:
    """The paths of `paths` that `declared` does not cover."""
    return [p for p in paths if not covers(declared, p)]


# ---------------------------------------------------------------------------------------------------
# dvc.lock


def read_lock(dvc_lock_path) -> dict:
    """dvc.lock parsed, with the shape checked that the functions below rely on."""
    path = Path(dvc_lock_path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    lock = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(lock, dict) or not isinstance(lock.get("stages"), dict):
        raise PipelineError(f"{path}: no 'stages' mapping (not a dvc.lock)")
    for name, stage in lock["stages"].items():
        for kind in ("deps", "outs"):
            for i, entry in enumerate(stage.get(kind) or []):
                if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                    raise PipelineError(f"{path}: stages.{name}.{kind}[{i}] has no path")
    return lock


def lock_out_hashes(dvc_lock_path) -> dict[str, str]:
    """Every output of every stage in dvc.lock, path -> md5 (a directory's ends in '.dir')."""
    out = {}
    for name, stage in read_lock(dvc_lock_path)["stages"].items():
        for entry in stage.get("outs") or []:
            if "md5" not in entry:
                raise PipelineError(f"{dvc_lock_path}: stages.{name}.outs {entry['path']} has no md5")
            out[entry["path"]] = entry["md5"]
    return out


def masked_lock(dvc_lock_path, declared) -> dict:
    """dvc.lock without what the declared outputs make vary: the content fields of every dep or out entry
    that is declared, lies in a declared folder, or holds a declared file. Two runs of one commit give
    equal masked locks; any other change (a deterministic output, a dep, params, a command) remains."""
    lock = read_lock(dvc_lock_path)
    for stage in lock["stages"].values():
        for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
            path = entry["path"]
            if covers(declared, path) or any(covers([path], d) for d in declared):
                for field in CONTENT_FIELDS:
                    entry.pop(field, None)
    return lock


# ---------------------------------------------------------------------------------------------------
# Comparing two runs


def file_hashes(root, path: str) -> dict[str, str]:
    """md5 of `root/path`, or of every file beneath it when it is a folder, keyed by repository path."""
    base = Path(root)
    target = base / path
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    out = {}
    for f in files:
        with f.open("rb") as fh:
            out[f.relative_to(base).as_posix()] = hashlib.file_digest(fh, "md5").hexdigest()
    return out


def differing_outputs(lock_a, lock_b, root_a=None, root_b=None) -> list[str]:
    """Outputs whose recorded md5 differs between two dvc.lock files, or that only one records.

    Given the two workspaces, a differing directory output is replaced by the files in it that differ or
    exist on one side only (the same comparison DVC's per-file hashes make)."""
    a, b = lock_out_hashes(lock_a), lock_out_hashes(lock_b)
    differing = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) == b.get(path):
            continue
        is_dir = str(a.get(path, "")).endswith(".dir") and str(b.get(path, "")).endswith(".dir")
        if is_dir and root_a is not None and root_b is not None:
            fa, fb = file_hashes(root_a, path), file_hashes(root_b, path)
            differing += [f for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
        else:
            differing.append(path)
    return differing


def unknown_declarations(declared, dvc_lock_path, root) -> list[str]:
    """Declared paths that are neither an output in dvc.lock nor a path inside a directory output of
    `root`, the workspace that lock describes (so that the list cannot outlive what it names)."""
    outs = lock_out_hashes(dvc_lock_path)
    known = []
    for d in declared:
        inside = any(md5.endswith(".dir") and covers([out], d) for out, md5 in outs.items())
        if d in outs or (inside and (Path(root) / d).exists()):
            known.append(d)
    return [d for d in declared if d not in known]


def expanded_stages(dvc_yaml, params_yaml) -> dict:
    """The stages of a dvc.yaml with `foreach` stages expanded as DVC does (`name@item`, `${item}`
    substituted); a `foreach` list is a `${a.b}` reference into params_yaml."""
    params = yaml.safe_load(Path(params_yaml).read_text())
    stages = {}
    for name, spec in yaml.safe_load(Path(dvc_yaml).read_text())["stages"].items():
        if "foreach" not in spec:
            stages[name] = spec
            continue
        reference = re.fullmatch(r"\$\{(.+)\}", str(spec["foreach"]))
        if reference is None:
            raise PipelineError(f"{dvc_yaml}: stage {name}: foreach must be a ${{params.key}} reference")
        items = params
        for part in reference.group(1).split("."):
            items = items[part]
        template = yaml.safe_dump(spec["do"])
        for item in items:
            stages[f"{name}@{item}"] = yaml.safe_load(template.replace("${item}", str(item)))
    return stages

"""Collect a one-parameter sweep of DVC experiments (`dvc exp show --json`) into a small file the report reads.

The report stage cannot ask DVC for experiments itself: it runs inside `dvc repro` (and inside every queued
experiment), and its output must depend only on its declared inputs. So the sweep is snapshotted here, into
a git-tracked file (`sweeps/temperature.json`) that the report stage depends on; collecting again after new
experiments changes the file, and `dvc repro` re-renders the report:

    dvc exp run --queue -S 'distill.temperature=1.0,2.0,4.0,6.0,8.0'
    dvc exp run --run-all -j 1                       # or: dvc queue start -j 1, then wait
    python -m aladin.sweep --out sweeps/temperature.json
    dvc repro report

A point is the baseline commit or one of its experiments whose `params.yaml` differs from the baseline in
the swept key only (experiments that also change something else are listed as excluded, with the keys
they change). Each point keeps the rsum of every head and protocol of `metrics/eval.json`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .io import PipelineError, write_json

SCHEMA_VERSION = 1
PARAMS_FILE = "params.yaml"
EVAL_FILE = "metrics/eval.json"
DEFAULT_PARAM = "distill.temperature"


def flatten(mapping: dict, prefix: str = "") -> dict:
    """Nested params -> {"a.b.c": value}; lists stay values."""
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _rows(doc: list) -> list[tuple[str, dict, str]]:
    """(kind, row, parent rev) for every commit row and experiment row of `dvc exp show --json`."""
    if not isinstance(doc, list):
        raise PipelineError("dvc exp show --json: expected a list of commit rows")
    rows = []
    for commit in doc:
        if not isinstance(commit, dict) or "rev" not in commit:
            raise PipelineError("dvc exp show --json: a commit row without 'rev'")
        if commit["rev"] == "workspace":
            continue  # the workspace repeats the baseline or the last applied experiment
        rows.append(("baseline", commit, commit["rev"]))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                rows.append(("experiment", dict(rev, name=rev.get("name") or exp.get("name")), commit["rev"]))
    return rows


def _params(row: dict) -> dict | None:
    data = (row.get("data") or {}).get("params") or {}
    params = (data.get(PARAMS_FILE) or {}).get("data")
    return flatten(params) if isinstance(params, dict) else None


def _rsums(row: dict) -> dict | None:
    """{head: {protocol: rsum}} from metrics/eval.json; protocols recorded as absent are left out."""
    metrics = ((row.get("data") or {}).get("metrics") or {}).get(EVAL_FILE) or {}
    data = metrics.get("data")
    if not isinstance(data, dict):
        return None
    out = {}
    for head, record in sorted(data.items()):
        if isinstance(record, dict):
            rsums = {p: r["rsum"] for p, r in sorted(record.items()) if isinstance(r, dict) and "rsum" in r}
            if rsums:
                out[head] = rsums
    return out or None


def collect(doc: list, param: str = DEFAULT_PARAM) -> dict:
    """The sweep over `param` in a `dvc exp show --json` document (see the module docstring)."""
    rows = _rows(doc)
    baselines = [(r, rev) for kind, r, rev in rows if kind == "baseline"]
    if not baselines:
        raise PipelineError("dvc exp show --json: no baseline commit (is this a git repository with a commit?)")
    base_row, base_rev = baselines[0]
    base_params = _params(base_row)
    points, excluded = [], []
    for kind, row, parent in rows:
        if parent != base_rev:
            continue
        name = row.get("name") or row["rev"][:7]
        params, rsums = _params(row), _rsums(row)
        if row.get("error") or params is None or rsums is None:
            excluded.append({"name": name, "rev": row["rev"], "reason": "failed or without metrics/eval.json"})
            continue
        if param not in params:
            raise PipelineError(f"dvc exp show --json: experiment {name} has no param '{param}'")
        if base_params is not None:
            changed = sorted(k for k in set(params) | set(base_params)
                             if k != param and params.get(k) != base_params.get(k))
            if changed:
                excluded.append({"name": name, "rev": row["rev"], "reason": "also changes " + ", ".join(changed)})
                continue
        points.append({"name": name, "rev": row["rev"], "kind": kind, "value": float(params[param]), "rsum": rsums})
    points.sort(key=lambda p: (p["value"], p["kind"] != "baseline", p["name"]))
    excluded.sort(key=lambda e: e["name"])
    return {"schema_version": SCHEMA_VERSION, "param": param, "baseline": base_rev, "points": points,
            "excluded": excluded}


def exp_show(cwd: str | None = None) -> list:
    """`dvc exp show --json` of the repository in `cwd`, parsed."""
    result = subprocess.run(["dvc", "exp", "show", "--json"], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"dvc exp show --json failed: {result.stderr.strip() or result.stdout.strip()}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as e:
        raise PipelineError(f"dvc exp show --json: not JSON ({e.msg} at line {e.lineno})") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="sweeps/temperature.json")
    parser.add_argument("--param", default=DEFAULT_PARAM, help="the swept params.yaml key (dotted)")
    parser.add_argument("--from-json", help="read a saved `dvc exp show --json` instead of running it")
    args = parser.parse_args(argv)
    try:
        if args.from_json:
            with open(args.from_json, encoding="utf-8") as f:
                doc = json.load(f)
        else:
            doc = exp_show()
        sweep = collect(doc, args.param)
        write_json(args.out, sweep)
    except (PipelineError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    values = sorted({p["value"] for p in sweep["points"]})
    print(f"{args.out}: {len(sweep['points'])} point(s) over {args.param} = {values}; "
          f"{len(sweep['excluded'])} excluded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Collecting a temperature sweep from `dvc exp show --json` (aladin.sweep).

The fixture is real output of DVC 3.67 for a micro pipeline with two queued experiments
(distill.temperature 1.0 and 4.0 beside the baseline's 6.0), trimmed to the keys the collector reads.
"""
import copy
import json
from pathlib import Path

import pytest

from aladin import sweep
from aladin.io import PipelineError

FIXTURE = Path(__file__).parent / "fixtures" / "sweep" / "exp_show.json"


@pytest.fixture
def doc():
    return json.loads(FIXTURE.read_text())


def experiments(doc):
    """(name, temperature, matching coco_5k rsum) read straight from the raw document."""
    out = []
    for commit in doc:
        rows = [] if commit["rev"] == "workspace" else [commit] + [r for e in commit["experiments"] or [] for r in e["revs"]]
        for r in rows:
            data = r["data"]
            out.append((r["name"], data["params"]["params.yaml"]["data"]["distill"]["temperature"],
                        data["metrics"]["metrics/eval.json"]["data"]["matching"]["coco_5k"]["rsum"]))
    return sorted(out, key=lambda t: t[1])


def test_collects_the_baseline_and_its_experiments(doc):
    result = sweep.collect(doc)
    assert result["param"] == "distill.temperature" and result["excluded"] == []
    assert result["baseline"] == doc[1]["rev"]
    got = [(p["name"], p["value"], p["rsum"]["matching"]["coco_5k"]) for p in result["points"]]
    assert got == experiments(doc)
    assert [p["value"] for p in result["points"]] == [1.0, 4.0, 6.0]
    assert [p["kind"] for p in result["points"]] == ["experiment", "experiment", "baseline"]
    assert set(result["points"][0]["rsum"]) == {"alignment", "matching", "rerank@10", "rerank@50", "rerank@100"}


def test_experiments_changing_other_params_or_failed_are_excluded(doc):
    doc = copy.deepcopy(doc)
    exps = doc[1]["experiments"]
    exps[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["distill"]["lr"] = 0.5
    exps[1]["revs"][0]["data"]["metrics"] = {}
    result = sweep.collect(doc)
    assert [p["kind"] for p in result["points"]] == ["baseline"]
    reasons = {e["name"]: e["reason"] for e in result["excluded"]}
    assert reasons == {exps[0]["name"]: "also changes distill.lr",
                       exps[1]["name"]: "failed or without metrics/eval.json"}


def test_other_param_and_errors(doc):
    result = sweep.collect(doc, param="seed")  # every point has seed 0, and the temperature differs
    assert [p["kind"] for p in result["points"]] == ["baseline"]
    assert len(result["excluded"]) == 2 and all("distill.temperature" in e["reason"] for e in result["excluded"])
    with pytest.raises(PipelineError, match="expected a list"):
        sweep.collect({"rev": "x"})
    with pytest.raises(PipelineError, match="no baseline commit"):
        sweep.collect([r for r in doc if r["rev"] == "workspace"])


def test_cli_writes_the_sweep_file(doc, tmp_path, capsys):
    out = tmp_path / "sweeps" / "temperature.json"
    assert sweep.main(["--from-json", str(FIXTURE), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == sweep.collect(doc)
    assert "3 point(s) over distill.temperature = [1.0, 4.0, 6.0]" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert sweep.main(["--from-json", str(bad), "--out", str(tmp_path / "x.json")]) == 1
    assert not (tmp_path / "x.json").exists()

"""Stage: the results report, a papermill run of `notebooks/report.py` exported to HTML.

Reads   --eval-metrics FILE (metrics/eval.json), --benchmark FILE (metrics/benchmark.json), --live DIR...
        (DVCLive folders of the training stages), --qualitative FILE (eval/qualitative.json), --dataset DIR
        (images named in the qualitative file), --sweep FILE (sweeps/temperature.json, `python -m
        aladin.sweep`), --peers DIR (metrics/peers: the neighbours' evaluate_peer outputs), --notebook FILE
        (jupytext py:percent source), params.yaml sections report, peers.recipes
Writes  --out DIR, owned by this stage and replaced as a whole: report.ipynb (executed), report.html
        (no code, no prompts, parameter cells removed: byte-identical across runs, DVC_AND_NOTEBOOKS.md
        5.5), figures/*.png, tables/results.csv and results.md; --scratch FILE (the converted notebook)
Run     dvc repro report
        python -m stages.report --eval-metrics metrics/eval.json --benchmark metrics/benchmark.json \
            --live dvclive/train_alignment dvclive/train_distill --qualitative eval/qualitative.json \
            --dataset data/dataset --sweep sweeps/temperature.json --peers metrics/peers --out reports
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import jupytext
import nbformat
import papermill
from nbconvert import HTMLExporter
from nbconvert.preprocessors import TagRemovePreprocessor
from traitlets.config import Config

from aladin import report
from aladin.config import load_params
from aladin.io import PipelineError, atomic_path, read_json
from stages.common import run

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL = "python3"  # the kernelspec ipykernel installs into the venv (DVC_AND_NOTEBOOKS.md 5.3)
PARAMETER_TAGS = ("parameters", "injected-parameters")
# Curve-encrypted kernel channels where the kernelspec supports them (ipykernel 7 warns on plain TCP).
KERNEL_CONFIG = Config({"KernelManager": {"transport_encryption": "auto"}})


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--eval-metrics", required=True)
    p.add_argument("--benchmark", required=True)
    p.add_argument("--sweep", required=True)
    p.add_argument("--peers", required=True)
    p.add_argument("--live", nargs="+", required=True)
    p.add_argument("--qualitative", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--notebook", default=str(REPO_ROOT / "notebooks" / "report.py"))
    p.add_argument("--scratch", default="build/report.in.ipynb")
    return p.parse_args(argv)


def check_inputs(args, top_k: int, recipes: tuple[str, ...]) -> None:
    """Fail before the kernel starts: a missing file or a malformed record gives one named error."""
    for label, path, is_dir in [("--notebook", args.notebook, False), ("--eval-metrics", args.eval_metrics, False),
                                ("--benchmark", args.benchmark, False), ("--qualitative", args.qualitative, False),
                                ("--sweep", args.sweep, False), ("--dataset", args.dataset, True),
                                ("--peers", args.peers, True)] + \
            [("--live", d, True) for d in args.live]:
        if not (Path(path).is_dir() if is_dir else Path(path).is_file()):
            raise PipelineError(f"{path}: {'folder' if is_dir else 'file'} not found ({label})")
    evaluation, bench = read_json(args.eval_metrics), read_json(args.benchmark)
    report.build_results_table(evaluation, source=args.eval_metrics)
    report.efficiency_table(evaluation, bench, source=args.benchmark)
    report.sweep_table(read_json(args.sweep), source=args.sweep)
    report.systems_table(evaluation, bench, report.load_peers(args.peers, recipes))
    report.load_histories(args.live)
    qualitative = read_json(args.qualitative)
    stored_k = qualitative.get("top_k") if isinstance(qualitative, dict) else None
    if not isinstance(stored_k, int) or stored_k < top_k:
        raise PipelineError(f"{args.qualitative}: top_k is {stored_k!r}, report.qualitative_top_k asks for {top_k}")
    images = qualitative.get("images")
    if not isinstance(images, dict):
        raise PipelineError(f"{args.qualitative}: 'images' must map image ids to paths under --dataset")
    for image_id, relative in sorted(images.items()):
        if not (Path(args.dataset) / relative).is_file():
            raise PipelineError(f"{Path(args.dataset) / relative}: image not found (qualitative images.{image_id})")


def export_html(executed: Path, html: Path) -> None:
    """Outputs only: no code, no prompts, and no parameter cells (their cell ids change every run)."""
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags=PARAMETER_TAGS), enabled=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4),
                                          resources={"metadata": {"name": "ALADIN report"}})
    html.write_text(body, encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        top_k = params.report.qualitative_top_k
        recipes = params.peers.recipes
        check_inputs(args, top_k, recipes)

        scratch = Path(args.scratch)
        notebook = jupytext.read(args.notebook, fmt="py:percent")
        for i, cell in enumerate(notebook.cells):  # jupytext draws random ids; the HTML anchors show them
            cell.id = f"cell-{i}"
        notebook.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
        with atomic_path(scratch) as tmp:
            nbformat.write(notebook, tmp)

        # The kernel imports `aladin` from this checkout whether or not the project is pip-installed.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), saved) if p)
        try:
            with atomic_path(args.out, directory=True) as out:
                out.chmod(0o755)  # mkdtemp makes it owner-only
                executed = out / "report.ipynb"
                try:
                    papermill.execute_notebook(
                        str(scratch), str(executed), kernel_name=KERNEL, log_output=False, progress_bar=False,
                        config=KERNEL_CONFIG,
                        parameters={"eval_metrics": args.eval_metrics, "benchmark": args.benchmark,
                                    "live_dirs": ",".join(args.live), "qualitative": args.qualitative,
                                    "dataset_dir": args.dataset, "sweep": args.sweep, "peers_dir": args.peers,
                                    "recipes": ",".join(recipes),
                                    "out_dir": str(out),
                                    "top_k": top_k})
                except papermill.PapermillExecutionError as e:
                    if e.ename in ("PipelineError", "ConfigError"):  # bad input found inside the notebook
                        raise PipelineError(e.evalue) from None
                    raise
                export_html(executed, out / "report.html")
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
        print(f"report: {Path(args.out) / 'report.html'}")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())

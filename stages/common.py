"""What every stage shares: the error policy and the DVCLive wiring.

A bad input stops a stage with one line, `error: <message naming the file, line or key>`, and exit code 1,
never a traceback. DVCLive is created here only (`dvcyaml=False`: the hand-written dvc.yaml owns metrics
and plots; DVC_AND_NOTEBOOKS.md 4.2).
"""
from __future__ import annotations

import sys
from typing import Callable

from aladin.config import ConfigError
from aladin.io import PipelineError


def run(main: Callable[[], int]) -> int:
    try:
        return main()
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def log_epoch(live, metrics: dict) -> None:
    """One DVCLive step per epoch, in the fixed namespace of DVC_AND_NOTEBOOKS.md 4.2."""
    live.log_metric("train/loss", metrics["train_loss"])
    live.log_metric("train/lr", metrics["lr"])
    for head, values in metrics["val"].items():
        live.log_metric(f"val/{head}/rsum", values["rsum"])
    live.log_metric("val/selection_rsum", metrics["selection_rsum"])
    live.next_step()

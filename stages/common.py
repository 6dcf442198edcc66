"""What every stage shares: the error policy.

A bad input stops a stage with one line, `error: <message naming the file, line or key>`, and exit code 1,
never a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

from aladin.config import ConfigError
from aladin.io import PipelineError, error_message


def run(main: Callable[[], int]) -> int:
    try:
        return main()
    except (ConfigError, PipelineError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1

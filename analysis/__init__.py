"""Analysis of token-length sweeps: load -> drop -> fit -> minima -> scaling law -> figures -> report.

    from analysis import load_results, analyze
    result = analyze(load_results("results/"), metric="zeroshot_top1", max_drop=1.0)
    result.min_tokens        # one row per (model, axis, strategy)

The command line is ``sweep analyze PATH`` (or ``python -m analysis PATH``), see `analysis.cli`. Names are imported
lazily so that ``from analysis.cli import register`` does not pull in pandas, scipy or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_results": "load",
    "load_table": "load",
    "load_result_dir": "load",
    "compute_drops": "drop",
    "summarize_cells": "drop",
    "fit_drop_curve": "fit",
    "drop_curve": "fit",
    "DropCurveFit": "fit",
    "min_tokens_table": "minima",
    "measured_min_tokens": "minima",
    "fit_scaling_law": "scaling",
    "Analysis": "pipeline",
    "analyze": "pipeline",
    "run_analysis": "pipeline",
    "make_figures": "pipeline",
    "write_outputs": "pipeline",
    "default_out_dir": "pipeline",
    "AnalysisInputError": "errors",
    "AnalysisWarning": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

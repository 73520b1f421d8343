"""Compare meta-learning solvers on one task family: the Python side of ``fewshot compare``.

>>> from fewshot.compare import run_comparison
>>> result = run_comparison(["MAML", "FOMAML"], dataset="sinusoid", meta_steps=20,
...                         eval_tasks=20, out="runs/demo")                       # doctest: +SKIP
>>> print(format_table(result.results))                                         # doctest: +SKIP

See ``docs/compare.md`` for the protocols and the files written.
"""

from ._run import Comparison, UsageError, format_fidelity, format_table, load_results, run_comparison

__all__ = ["run_comparison", "load_results", "format_table", "format_fidelity", "Comparison", "UsageError"]

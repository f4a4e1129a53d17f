"""Learning-efficiency and throughput benchmarks of jest_stream, with their data preparation.

Run them from the repository root as modules, e.g. ``python -m benchmarks.demo``.
"""

__all__: list[str] = []

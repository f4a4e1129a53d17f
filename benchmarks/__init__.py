"""Learning-efficiency and throughput benchmarks of jest_stream.

Run them from the repository root as modules, e.g. ``python -m benchmarks.demo``; what they
share (data, models, tasks, the training loop, statistics, the report) is in
:mod:`benchmarks.common`.
"""

__all__: list[str] = []

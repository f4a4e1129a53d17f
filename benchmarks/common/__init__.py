"""What the benchmarks share, so that each benchmark file keeps only what is particular to it.

- :mod:`~benchmarks.common.data`: Fashion-MNIST with label noise as MDS shards; reading them.
- :mod:`~benchmarks.common.captions`: captions of the pool for the contrastive task.
- :mod:`~benchmarks.common.models`: the CNNs, the two-tower model, the FlexiViT.
- :mod:`~benchmarks.common.tasks`: the classification and contrastive tasks, with their
  references stored through ``jest_stream.annotate`` and read through ``ReferenceCache``.
- :mod:`~benchmarks.common.training`: in-memory training, the selective training loop with
  its per-step costs, evaluation.
- :mod:`~benchmarks.common.stats`: means, spreads, t intervals, slopes, rank correlation.
- :mod:`~benchmarks.common.report`: the command line, the run record, the JSON and the PNG.
"""

__all__: list[str] = []

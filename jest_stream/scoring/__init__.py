"""Scorers: a super-batch in, :class:`~jest_stream.selection.BatchScores` out.

A scorer runs the learner (no gradients, eval mode, in chunks) and gets the
reference's outputs (a live frozen model or a table of stored values), then
applies the criterion. Write your own by following :class:`Scorer`: any
callable ``scorer(batch, sample_ids, criterion) -> BatchScores | Tensor[B]``
with a ``learner`` attribute (the module whose weights it reads, or None).

- :mod:`~jest_stream.scoring.base`: the protocol, scoring mode, chunking;
- :mod:`~jest_stream.scoring.checks`: checks of model outputs and scores;
- :mod:`~jest_stream.scoring.reference`: live and stored references;
- :mod:`~jest_stream.scoring.classification`, :mod:`~jest_stream.scoring.contrastive`,
  :mod:`~jest_stream.scoring.language_model`: the scorers.
"""

from jest_stream.errors import ScoreError
from jest_stream.scoring.base import LearningScorer, Scorer, scoring_mode
from jest_stream.scoring.checks import as_batch_scores, check_embeddings, check_per_example
from jest_stream.scoring.classification import ClassificationScorer
from jest_stream.scoring.contrastive import ContrastiveScorer
from jest_stream.scoring.language_model import LanguageModelScorer, sequence_losses
from jest_stream.scoring.proxy import ProxyScorer
from jest_stream.scoring.reference import (
    ColumnReference,
    ReferenceTable,
    freeze,
    require_output,
    resolve_reference,
)

__all__ = [
    'ClassificationScorer',
    'ColumnReference',
    'ContrastiveScorer',
    'LanguageModelScorer',
    'LearningScorer',
    'ProxyScorer',
    'ReferenceTable',
    'ScoreError',
    'Scorer',
    'as_batch_scores',
    'check_embeddings',
    'check_per_example',
    'freeze',
    'require_output',
    'resolve_reference',
    'scoring_mode',
    'sequence_losses',
]

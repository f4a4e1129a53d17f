"""jest_stream: joint example selection (JEST, Flexi-JEST) as a data loader.

Wraps a mosaicml-streaming ``StreamingDataset`` (or any map-style Dataset), draws
super-batches, scores every example with the model being trained and a frozen
reference, and hands the most learnable sub-batch to the trainer.
"""

from jest_stream.annotate import annotate
from jest_stream.batch import collate_samples, gather
from jest_stream.cache import CacheError, ReferenceCache, dataset_fingerprint, model_checksum
from jest_stream.config import ProcessSettings, SelectionConfig, super_batch_size_for
from jest_stream.criteria import CRITERIA, Criterion, get_criterion
from jest_stream.errors import (
    DataError,
    JestStreamError,
    MissingColumnError,
    ScoreError,
    SettingError,
    SettingTypeError,
    StateError,
    UnknownLengthError,
    UsageError,
)
from jest_stream.export import SampleSubset, read_ids
from jest_stream.flexi import (
    FlexiForward,
    FlexiPatchEmbed,
    LowResolution,
    MixedResolution,
    downsample,
    mixed_resolution_forward,
    mixed_resolution_loss,
    split_mixed_resolution,
)
from jest_stream.flops import count_flops, forward_flops, score_flops, train_step_flops
from jest_stream.log import LogError, SelectionLog, log_metrics, read_log
from jest_stream.losses import (
    infonce_conditional_losses,
    per_example_cross_entropy,
    sigmoid_pair_losses,
)
from jest_stream.policies import AdaptivePressure, Quota, Schedule, SelectionPolicy
from jest_stream.process import ScorerProcessError
from jest_stream.scores import (
    Embeddings,
    PerExampleScores,
    SigmoidPairScores,
    SoftmaxScores,
)
from jest_stream.scoring import (
    ClassificationScorer,
    ColumnReference,
    ContrastiveScorer,
    LanguageModelScorer,
    ProxyScorer,
    ReferenceTable,
    Scorer,
    freeze,
    sequence_losses,
)
from jest_stream.selection import (
    SELECTION_METHODS,
    BatchScores,
    get_selection_method,
    joint_select,
    joint_select_incremental,
    joint_select_softmax,
    sample_select,
    topk_select,
    uniform_select,
)
from jest_stream.shm import remove_stale_shared_memory
from jest_stream.step import SelectionStep

__version__ = '0.1.0'

# These need mosaicml-streaming, which takes seconds to import: they load on first use,
# so that a scorer process (which never reads a dataset) starts quickly.
_LAZY = {
    'SelectiveLoader': 'jest_stream.loader',
    'SampleIdStreamingDataset': 'jest_stream.source',
    'ID_KEY': 'jest_stream.source',
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

__all__ = [
    'DataError',
    'JestStreamError',
    'MissingColumnError',
    'ProcessSettings',
    'SelectionConfig',
    'SelectionStep',
    'SelectionPolicy',
    'Schedule',
    'AdaptivePressure',
    'Quota',
    'remove_stale_shared_memory',
    'SettingError',
    'SettingTypeError',
    'StateError',
    'UnknownLengthError',
    'UsageError',
    'SelectionLog',
    'LogError',
    'read_log',
    'log_metrics',
    'SampleSubset',
    'read_ids',
    'model_checksum',
    'dataset_fingerprint',
    'annotate',
    'ReferenceCache',
    'CacheError',
    'BatchScores',
    'ClassificationScorer',
    'collate_samples',
    'ColumnReference',
    'ContrastiveScorer',
    'LanguageModelScorer',
    'ProxyScorer',
    'count_flops',
    'CRITERIA',
    'Criterion',
    'downsample',
    'Embeddings',
    'FlexiForward',
    'FlexiPatchEmbed',
    'forward_flops',
    'freeze',
    'gather',
    'get_criterion',
    'get_selection_method',
    'ID_KEY',
    'infonce_conditional_losses',
    'joint_select',
    'joint_select_incremental',
    'joint_select_softmax',
    'LowResolution',
    'mixed_resolution_forward',
    'mixed_resolution_loss',
    'MixedResolution',
    'per_example_cross_entropy',
    'PerExampleScores',
    'ReferenceTable',
    'sample_select',
    'sequence_losses',
    'SampleIdStreamingDataset',
    'score_flops',
    'ScoreError',
    'ScorerProcessError',
    'Scorer',
    'SELECTION_METHODS',
    'SelectiveLoader',
    'sigmoid_pair_losses',
    'SigmoidPairScores',
    'SoftmaxScores',
    'split_mixed_resolution',
    'super_batch_size_for',
    'topk_select',
    'train_step_flops',
    'uniform_select',
]

"""``JESTLoaderCallback``: a ``SelectiveLoader`` as Composer's train dataloader."""

from __future__ import annotations

import warnings
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from torch import nn

from jest_stream.errors import SettingError, SettingTypeError
from jest_stream.integrations.composer.models import canonical_device, model_device, unwrap_model

__all__ = ['JESTLoaderCallback']


class JESTLoaderCallback(Callback):
    """Runs a :class:`~jest_stream.SelectiveLoader` that is Composer's ``train_dataloader``.

    The loader selects by itself (inline, or in its scorer process); Composer sees
    sub-batches and counts selected samples. Composer checkpoints the loader's position
    through ``train_dataloader.dataset.state_dict(num_samples, from_beginning)``, which the
    loader answers from its own count of super-batches handed over, and restores it into the
    fresh loader of a resumed run before the first batch, so nothing is drawn or scored twice.

    With ``scoring='process'`` the loader publishes the learner's weights to its scorer
    process by itself: it counts optimizer steps on the learner's parameters and publishes
    every ``sync_every`` of them when Composer asks for the next batch (after
    ``BATCH_END``), so this callback adds no publishing of its own. It checks what that
    relies on and what a Composer run would otherwise get silently wrong:

    - at ``FIT_START``: the train dataloader is a ``SelectiveLoader``; its scorer's learner is
      (part of) the model the trainer trains, not a copy; the loader delivers batches on the
      model's device; no :class:`JESTAlgorithm` selects a second time. It warns when a
      mid-epoch resume did not restore the loader's position (Composer would then spin the
      loader, drawing and scoring every skipped batch again);
    - at ``BATCH_END``: logs the loader's metrics of the batch (``jest/...``: timings,
      throughput, score statistics and, in process mode, weight staleness);
    - at ``FIT_END`` and on ``close``: stops the scorer process (a later ``fit`` restarts it
      with the current weights).

    Args:
        log_metrics (bool): Log the loader's per-batch metrics to Composer's logger.
    """

    def __init__(self, *, log_metrics: bool = True) -> None:
        self.log_metrics = log_metrics

    @staticmethod
    def _loader(state: State) -> Any:
        from jest_stream.loader import SelectiveLoader

        loader = state.train_dataloader
        if not isinstance(loader, SelectiveLoader):
            raise SettingTypeError(
                f'JESTLoaderCallback needs a jest_stream SelectiveLoader as the train dataloader, '
                f'got {type(loader).__name__}; for a DataLoader of super-batches use '
                f'JESTAlgorithm instead')
        return loader

    def fit_start(self, state: State, logger: Logger) -> None:
        loader = self._loader(state)
        from jest_stream.integrations.composer.algorithm import JESTAlgorithm

        if any(isinstance(algorithm, JESTAlgorithm) for algorithm in state.algorithms):
            raise SettingTypeError('JESTAlgorithm would select a second time from the '
                                   'SelectiveLoader\'s sub-batches: use one of the two')
        model = unwrap_model(state.model)
        device = model_device(model)
        if device is not None and canonical_device(device) != canonical_device(loader.device):
            raise SettingError(
                f'the SelectiveLoader delivers batches on {loader.device} but the model trains '
                f'on {device}; build the loader with device={str(device)!r} (it defaults to the '
                f'device of the learner when the loader is built, before the Trainer moves the '
                f'model)')
        learner = getattr(loader.scorer, 'learner', None)
        if loader.config.criterion.needs_learner and isinstance(learner, nn.Module):
            trained = {id(param) for param in model.parameters()}
            scored = [param for param in learner.parameters()]
            if scored and not all(id(param) in trained for param in scored):
                raise SettingError(
                    'the SelectiveLoader\'s scorer scores with a learner whose parameters are not '
                    'those of the model the Trainer trains, so it would select with stale weights; '
                    'give the scorer the trained model itself (the ComposerModel or its inner '
                    'module), not a copy')
        if int(state.timestamp.batch_in_epoch) > 0 and 'train' not in state.dataset_resumption:
            warnings.warn(
                'resuming mid-epoch without the SelectiveLoader\'s position in the checkpoint: '
                'Composer will spin the loader, drawing and scoring every batch it skips. Load '
                'a checkpoint saved with this loader as the train dataloader.', stacklevel=2)

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.log_metrics:
            return
        metrics = self._loader(state).metrics
        logger.log_metrics({f'jest/{key}': float(value) for key, value in metrics.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool)})

    def fit_end(self, state: State, logger: Logger) -> None:
        self._loader(state).close()

    def close(self, state: State, logger: Logger) -> None:
        loader = state.train_dataloader
        if loader is not None and hasattr(loader, 'close'):
            loader.close()

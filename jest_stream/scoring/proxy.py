"""A proxy learner: a small model that scores for the big one and learns from what it selects.

Scoring a super-batch with the learner costs a forward pass over ``B`` examples per step, as
much as the training step itself at ``f = 0.67`` and several times it at ``f = 0.8`` or
more: selection then saves steps but not time. A *proxy learner* is a much smaller model of
the same task, trained online on the sub-batches it selects (one optimizer step per
super-batch), whose loss stands in for the learner's: RHO-LOSS's ``proxy_model``
(Mindermann et al., 2022, section 4.2) and ClassAct's small scorers for a large learner
(Evans et al., ECCV 2024).

:class:`ProxyScorer` wraps any built-in scorer whose ``learner`` is the proxy. It has no
``learner`` of its own (``learner = None``): nothing is shared with the trainer, and with
``scoring='process'`` the proxy lives and trains in the scorer process. Its weights and its
optimizer's state are part of the loader's ``state_dict`` (the state after the last
super-batch handed over), so resumption stays exact, and its training FLOPs count in the
scoring FLOPs (``proxy_flops`` in the telemetry).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from jest_stream.batch import Batch, gather
from jest_stream.checks import check_int
from jest_stream.criteria import Criterion
from jest_stream.errors import SettingError, SettingTypeError, StateError

__all__ = ['ProxyScorer', 'PROXY_STATE_VERSION', 'DEFAULT_OPTIMIZER']

PROXY_STATE_VERSION = 1
#: Adam with a learning rate of 1e-3 (a partial, so that it pickles for process scoring).
DEFAULT_OPTIMIZER = functools.partial(torch.optim.Adam, lr=1e-3)


class ProxyScorer:
    """Scores with a proxy learner, and trains it on the rows selected from each super-batch.

    Example, a small CNN scoring for a ResNet::

        proxy = SmallCNN()
        scorer = ProxyScorer(ClassificationScorer(proxy, reference_cache, input_key='image',
                                                  target_key='label'))
        loader = SelectiveLoader(dataset, batch_size=64, filter_ratio=0.8, scorer=scorer)

    Args:
        scorer (ClassificationScorer | LanguageModelScorer | ContrastiveScorer): A scorer
            whose ``learner`` is the proxy model; it scores, and its ``training_loss`` is what
            the proxy minimises.
        optimizer (Callable): ``optimizer(parameters) -> torch.optim.Optimizer``, built
            where the proxy trains (it must pickle for process scoring: a
            ``functools.partial``); Adam with learning rate 1e-3 by default.
        steps (int): Optimizer steps on each selected sub-batch (1 by default).

    Raises:
        SettingTypeError: ``scorer`` has no ``nn.Module`` learner or no ``training_loss``, or
            ``optimizer`` is not callable.
        SettingError: ``steps`` is not a positive int.
    """

    #: Nothing to mirror from the trainer: the proxy's weights are its own.
    learner = None

    def __init__(self, scorer: Any, *,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                 = DEFAULT_OPTIMIZER, steps: int = 1) -> None:
        proxy = getattr(scorer, 'learner', None)
        if not isinstance(proxy, nn.Module) or not any(True for _ in proxy.parameters()):
            raise SettingTypeError('ProxyScorer(scorer) needs a scorer whose learner is the '
                                   'proxy model, an nn.Module with parameters')
        if not callable(getattr(scorer, 'training_loss', None)):
            raise SettingTypeError(f'{type(scorer).__name__} has no training_loss(model, '
                                   f'batch, sample_ids): the proxy cannot learn from it')
        if not callable(optimizer):
            raise SettingTypeError('optimizer must be callable: optimizer(parameters) -> '
                                   'torch.optim.Optimizer')
        self.scorer = scorer
        self.proxy: nn.Module = proxy
        self.make_optimizer = optimizer
        self.steps = check_int(steps, 'steps', low=1)
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self.updates = 0

    def __call__(self, batch: Batch, sample_ids: Tensor, criterion: Criterion) -> Any:
        """Score with the proxy (the wrapped scorer's call)."""
        if not criterion.needs_learner:
            raise SettingError(f'criterion={criterion.name!r} ignores the learner, so a proxy '
                               f'learner has nothing to do: use the reference scorer directly')
        return self.scorer(batch, sample_ids, criterion)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The proxy's optimizer, built on first use where the proxy trains."""
        if self._optimizer is None:
            self._optimizer = self.make_optimizer(self.proxy.parameters())
            if self._pending is not None:
                self._optimizer.load_state_dict(self._pending)
                self._pending = None
        return self._optimizer

    def learn(self, batch: Batch, sample_ids: Tensor, rows: Tensor, *,
              count_flops: bool = False, seed: int | None = None) -> int | None:
        """Train the proxy on ``rows`` of the super-batch: the sub-batch just selected.

        Args:
            batch (Batch): The super-batch (or the candidates scored from it).
            sample_ids (LongTensor[n]): Its sample ids.
            rows (LongTensor[b]): The selected rows.
            count_flops (bool): Count the FLOPs of the forward and backward passes.
            seed (int, optional): Seed of the update's random draws (dropout), from the
                super-batch's position; the caller's global generators are left as they were.

        Returns:
            int | None: The FLOPs of the training passes, when counted.
        """
        sub, ids = gather(batch, rows), sample_ids[rows.cpu()]
        training = self.proxy.training
        self.proxy.train()
        counter = FlopCounterMode(display=False) if count_flops else None
        try:
            with torch.enable_grad(), (counter if counter is not None else nullcontext()), \
                    _seeded(seed, _device_of(self.proxy)):
                for _ in range(self.steps):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self.scorer.training_loss(self.proxy, sub, ids)
                    loss.backward()
                    self.optimizer.step()
        finally:
            self.proxy.train(training)
        self.updates += 1
        return None if counter is None else int(counter.get_total_flops())

    def state_dict(self) -> dict[str, Any]:
        """The proxy's weights, its optimizer's state and its update count (copies)."""
        optimizer = self._optimizer.state_dict() if self._optimizer is not None \
            else self._pending
        return copy.deepcopy({'version': PROXY_STATE_VERSION, 'updates': self.updates,
                              'model': self.proxy.state_dict(), 'optimizer': optimizer})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: all of it, or nothing when it does not fit.

        Raises:
            StateError: Another version, a missing or ill-typed field (``model``,
                ``updates``, ``optimizer``), or weights that do not fit the proxy.
        """
        if not isinstance(state, dict) or state.get('version') != PROXY_STATE_VERSION:
            raise StateError('the proxy learner\'s state was not saved by this ProxyScorer '
                             '(or by another version): resume with the scorer it was saved with')
        updates, optimizer = state.get('updates'), state.get('optimizer')
        if not isinstance(state.get('model'), dict) or isinstance(updates, bool) \
                or not isinstance(updates, int) or updates < 0 \
                or not (optimizer is None or isinstance(optimizer, dict)
                        and {'state', 'param_groups'} <= set(optimizer)):
            raise StateError('the proxy learner\'s state lacks its weights (model), its update '
                             'count (updates, an int >= 0) or its optimizer state (optimizer): '
                             'resume from a state this ProxyScorer saved')
        before = copy.deepcopy(self.proxy.state_dict())
        try:
            self.proxy.load_state_dict(state['model'])
        except RuntimeError as error:
            # torch copies the tensors that fit before it reports the others: put them back.
            self.proxy.load_state_dict(before)
            raise StateError(f'the saved proxy weights do not fit this proxy model: '
                             f'{error}') from None
        if optimizer is not None:
            # The optimizer is built where the proxy trains; a throwaway one checks now that
            # the saved state fits it (parameter groups and their sizes), not at the first step.
            try:
                self.make_optimizer(self.proxy.parameters()).load_state_dict(
                    copy.deepcopy(optimizer))
            except (ValueError, KeyError, TypeError, RuntimeError) as error:
                self.proxy.load_state_dict(before)
                raise StateError(f'the saved optimizer state does not fit this proxy\'s '
                                 f'optimizer: {error}; resume with the optimizer it was saved '
                                 f'with') from None
        self.updates = updates
        self._optimizer = None
        self._pending = copy.deepcopy(optimizer)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Dropout and other modules draw from torch's global generators, which a library may
    not take over: fork them (restored on exit) and seed the fork."""
    if seed is None:
        yield
        return
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield

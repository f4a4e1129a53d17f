"""The proxy learner: a small model scores for the big one, learns from what it selects,
and resumes exactly, inline and in the scorer process."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels
from helpers.loops import sub_batch_ids
from helpers.models import tiny_classifier
from jest_stream import (
    ClassificationScorer,
    ProxyScorer,
    SelectiveLoader,
    SettingError,
    StateError,
)


def _tensors(n: int = 400) -> TensorDataset:
    x, y = features_and_labels(n)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _proxy_scorer(seed: int = 3, dropout: float = 0.0) -> ProxyScorer:
    proxy = tiny_classifier(seed)
    if dropout:  # draws from torch's global generator while the proxy learns
        proxy = torch.nn.Sequential(torch.nn.Dropout(dropout), proxy)
    inner = ClassificationScorer(proxy, tiny_classifier(1), input_key=0, target_key=1)
    return ProxyScorer(inner, optimizer=functools.partial(torch.optim.SGD, lr=0.5))


def _loader(scorer, **kwargs) -> SelectiveLoader:
    return SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=scorer, seed=6,
                           method='topk', timeout=60, **kwargs)


def _run(loader, steps, breaks=()):
    return sub_batch_ids(loader, steps, 2, breaks=breaks)


def test_the_proxy_learns_from_what_it_selects():
    scorer = _proxy_scorer()
    before = {k: v.clone() for k, v in scorer.proxy.state_dict().items()}
    loader = _loader(scorer, count_flops=True)
    x, y = features_and_labels(400)
    loss = torch.nn.functional.cross_entropy
    start = float(loss(scorer.proxy(torch.from_numpy(x)), torch.from_numpy(y)))
    assert len(_run(loader, 20)) == 20
    assert scorer.updates == 20
    assert any(not torch.equal(before[k], v) for k, v in scorer.proxy.state_dict().items())
    # It learned the task from the selected rows only.
    assert float(loss(scorer.proxy(torch.from_numpy(x)), torch.from_numpy(y))) < start
    metrics = loader.metrics
    assert metrics['proxy_flops'] > 0 and metrics['score_flops'] > metrics['proxy_flops']


# Dropout draws random masks while the proxy learns: with it, the scorer process must draw
# the masks an inline run draws.
@pytest.mark.parametrize('scoring, dropout', [('inline', 0.0), ('inline', 0.5),
                                              ('process', 0.5)])
def test_resumption_restores_the_proxy_exactly(scoring, dropout):
    with _loader(_proxy_scorer(dropout=dropout), scoring=scoring) as loader:
        full = _run(loader, 16)
        final = loader.state_dict()['scorer']
    torch.rand(5)  # the global generator moves on between runs, as in any program
    with _loader(_proxy_scorer(dropout=dropout), scoring=scoring) as first:
        before = _run(first, 7)
        state = first.state_dict()
    assert state['scorer']['updates'] == 7
    # A fresh proxy (other initial weights) takes the saved ones.
    with _loader(_proxy_scorer(seed=9, dropout=dropout), scoring=scoring) as resumed:
        resumed.load_state_dict(state)
        assert before + _run(resumed, 9) == full
        after = resumed.state_dict()['scorer']
    for key, value in final['model'].items():
        assert torch.equal(value, after['model'][key]), key
    assert after['updates'] == final['updates'] == 16


def test_process_scoring_selects_as_inline_and_forgets_what_it_scored_ahead():
    dropout = 0.5
    # The scorer process scores ahead (and so learns ahead); leaving an epoch early must
    # forget what it learned from super-batches never handed over, as inline scoring never
    # saw them. With dropout, both draw the same masks from the super-batch's position.
    with _loader(_proxy_scorer(dropout=dropout)) as inline:
        expected = _run(inline, 18, breaks=(3, 11))
    with _loader(_proxy_scorer(dropout=dropout), scoring='process',
                 prefetch_depth=3) as process:
        assert _run(process, 18, breaks=(3, 11)) == expected
        # Closing brings what it learned back, so a new scorer process continues from it.
        process.close()
        more = _run(process, 2)
    with _loader(_proxy_scorer(dropout=dropout)) as inline:
        assert _run(inline, 20, breaks=(3, 11, 18))[18:] == more


def test_proxy_settings_and_states_are_checked():
    with pytest.raises(SettingError, match='selection_scope="rank"'):
        _loader(_proxy_scorer(), selection_scope='global')
    loader = SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8,
                             scorer=_proxy_scorer(), criterion='easy_reference')
    with pytest.raises(SettingError, match='ignores the learner'):
        next(iter(loader))
    plain = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                 target_key=1)
    state = _loader(_proxy_scorer()).state_dict()
    with pytest.raises(StateError, match='does not learn'):
        _loader(plain).load_state_dict(state)
    with pytest.raises(StateError, match='holds none of its state'):
        _loader(_proxy_scorer()).load_state_dict(_loader(plain).state_dict())
    with pytest.raises(TypeError, match='learner is the proxy model'):
        ProxyScorer(ClassificationScorer(None, tiny_classifier(1)))


def _weights(scorer: ProxyScorer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in scorer.proxy.parameters()]


@pytest.fixture(scope='module')
def trained_state():
    with _loader(_proxy_scorer(), policy=_adaptive()) as trained:
        _run(trained, 3)
        return trained.state_dict()


def _adaptive():
    from jest_stream import AdaptivePressure, SelectionPolicy
    return SelectionPolicy(adaptive=AdaptivePressure(window=1))


@pytest.mark.parametrize('damage', ['no model', 'no updates', 'negative updates',
                                    'bool updates', 'wrong shapes', 'other optimizer'])
def test_a_damaged_proxy_state_is_refused_and_changes_nothing(trained_state, damage):
    state = copy.deepcopy(trained_state)
    scorer = state['scorer']
    if damage == 'no model':
        del scorer['model']
    elif damage == 'no updates':
        del scorer['updates']
    elif damage in ('negative updates', 'bool updates'):
        scorer['updates'] = -1 if damage == 'negative updates' else True
    elif damage == 'wrong shapes':
        first = next(iter(scorer['model']))
        scorer['model'][first] = torch.zeros(3, 3)
    else:  # a state of Adam, whose per-parameter state SGD's optimizer would not take
        scorer['optimizer']['param_groups'] = []
    fresh = _proxy_scorer(seed=9)
    loader = _loader(fresh, policy=_adaptive())
    before = _weights(fresh)
    with pytest.raises(StateError, match='proxy'):
        loader.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(fresh), strict=True))
    assert fresh.updates == 0


def test_a_refused_loader_state_leaves_the_policy_and_the_proxy_as_they_were(trained_state):
    state = copy.deepcopy(trained_state)
    state['policy']['adaptive']['multiplier'] = 0.5
    state['scorer']['updates'] = 'three'  # refused after the policy was loaded
    fresh = _proxy_scorer(seed=9)
    loader = _loader(fresh, policy=_adaptive())
    before = _weights(fresh)
    with pytest.raises(StateError):
        loader.load_state_dict(state)
    assert loader.policy.adaptive.multiplier == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(fresh), strict=True))

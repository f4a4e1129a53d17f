"""One validated configuration: every numeric setting refuses bools, NaN, inf and invalid
zeros, in the loader and in the Composer algorithm alike, with the setting's name."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels
from helpers.models import tiny_classifier
from jest_stream import (
    ClassificationScorer,
    JestStreamError,
    SelectionConfig,
    SelectiveLoader,
    SettingError,
)

NAN, INF = math.nan, math.inf


@pytest.fixture
def dataset():
    x, y = features_and_labels(60)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _scorer():
    return ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                target_key=1)


# (setting, bad values): every numeric setting of the loader, with what it must refuse.
LOADER_SETTINGS = [
    ('batch_size', [True, 0, -1, 2.0, NAN]),
    ('filter_ratio', [True, NAN, INF, -INF, 1.0, -0.1, 'half']),
    ('super_batch_size', [True, 0, 10.0, 5]),
    ('n_chunks', [True, 0, -2, 1.5, NAN]),
    ('temperature', [True, NAN, INF, -1.0, '1']),
    ('seed', [True, 1.5, NAN]),
    ('timeout', [True, NAN, INF, -1.0]),
    ('num_workers', [True, -1, 1.0]),
    ('prefetch_factor', [True, 0, 2.5]),
]


def _loader_kwargs(setting, value):
    kwargs = {'batch_size': 10, 'filter_ratio': 0.5, 'scorer': _scorer()}
    if setting == 'super_batch_size':
        del kwargs['filter_ratio']
    kwargs[setting] = value
    return kwargs


@pytest.mark.parametrize('setting, value', [(s, v) for s, values in LOADER_SETTINGS
                                            for v in values])
def test_loader_refuses_bad_numbers_naming_the_setting(dataset, setting, value):
    with pytest.raises(JestStreamError, match=setting):
        SelectiveLoader(dataset, **_loader_kwargs(setting, value))


PROCESS_SETTINGS = [
    ('sync_every', [True, 0, 1.0]),
    ('max_staleness', [True, -1, 0.5]),
    ('prefetch_depth', [True, 0, 2.0]),
]


@pytest.mark.parametrize('setting, value', [(s, v) for s, values in PROCESS_SETTINGS
                                            for v in values])
def test_process_settings_refuse_bad_numbers(dataset, setting, value):
    with pytest.raises(JestStreamError, match=setting):
        SelectiveLoader(dataset, batch_size=10, filter_ratio=0.5, scorer=_scorer(),
                        scoring='process', **{setting: value})


def test_timeout_zero_means_no_timeout_inline_and_is_refused_with_process_scoring(dataset):
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.5, scorer=_scorer(),
                             timeout=0)
    assert loader.config.timeout == 0 and len(next(iter(loader))[0]) == 10
    with pytest.raises(SettingError, match=r'timeout=0 means no timeout.*bounded'):
        SelectiveLoader(dataset, batch_size=10, filter_ratio=0.5, scorer=_scorer(), timeout=0,
                        scoring='process')


def test_the_resolved_configuration_is_public_and_printable(dataset):
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=_scorer())
    assert loader.config.super_batch_size == 50 and loader.config.method == 'joint'
    text = repr(loader)
    for part in ("batch_size=10", "super_batch_size=50", "filter_ratio=0.8",
                 "criterion='learnability'", "method='joint'", "n_chunks=16",
                 "temperature=1.0", "seed=0", "scoring='inline'"):
        assert part in text, part


def test_sizes_follow_from_any_two_and_must_agree():
    assert SelectionConfig.create(batch_size=8, filter_ratio=0.75).super_batch_size == 32
    assert SelectionConfig.create(batch_size=8, super_batch_size=32).filter_ratio == 0.75
    unsized = SelectionConfig.create(filter_ratio=0.75)
    assert not unsized.sized
    assert unsized.with_super_batch_size(32).batch_size == 8
    with pytest.raises(SettingError, match='not a whole sub-batch size'):
        unsized.with_super_batch_size(30)
    with pytest.raises(SettingError, match='does not match'):
        SelectionConfig(batch_size=8, super_batch_size=32, filter_ratio=0.5)
    with pytest.raises(SettingError, match='not both'):
        SelectionConfig.create(batch_size=8, filter_ratio=0.75, super_batch_size=32)


def test_replace_checks_the_new_values():
    import dataclasses

    config = SelectionConfig.create(batch_size=8, filter_ratio=0.75)
    with pytest.raises(JestStreamError, match='temperature'):
        dataclasses.replace(config, temperature=NAN)


composer = pytest.importorskip('composer')

ALGORITHM_SETTINGS = [
    ('filter_ratio', [True, NAN, INF, 1.0, -0.5]),
    ('batch_size', [True, 0, 2.5]),
    ('n_chunks', [True, 0, NAN]),
    ('temperature', [True, NAN, INF, -1.0]),
    ('seed', [True, 2.5]),
    ('chunk_size', [True, 0, 1.5]),
    ('start', [True, NAN, INF, -0.1, 1.5]),
    ('end', [True, NAN, INF, 1.5]),
]


@pytest.mark.parametrize('setting, value', [(s, v) for s, values in ALGORITHM_SETTINGS
                                            for v in values])
def test_algorithm_refuses_the_same_bad_numbers(setting, value):
    from jest_stream.integrations.composer import JESTAlgorithm

    kwargs = {'filter_ratio': 0.5, 'reference': tiny_classifier(1)}
    if setting == 'batch_size':
        del kwargs['filter_ratio']
    kwargs[setting] = value
    with pytest.raises(JestStreamError, match=setting):
        JESTAlgorithm(**kwargs)


def test_algorithm_builds_the_same_configuration_as_the_loader(dataset):
    from jest_stream.integrations.composer import JESTAlgorithm

    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=tiny_classifier(1), seed=3,
                              n_chunks=4, temperature=0.5)
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=_scorer(),
                             seed=3, n_chunks=4, temperature=0.5)
    sized = algorithm.config.with_super_batch_size(50)
    assert sized.describe() == {**loader.config.describe(), 'timeout': sized.timeout}

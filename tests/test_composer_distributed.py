"""JESTAlgorithm with a proxy learner under DDP: real Composer trainers on two gloo ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.distributed as dist

from helpers.composer_ranks import SAVE_AT, STEPS, proxy_worker
from helpers.distributed import free_port, spawn
from helpers.models import tiny_classifier
from jest_stream import ClassificationScorer, ProxyScorer
from jest_stream.errors import SettingTypeError, UsageError
from jest_stream.integrations.composer import JESTAlgorithm
from jest_stream.integrations.composer import algorithm as algorithm_module


def test_every_rank_resumes_its_proxy_exactly_from_rank_0s_checkpoint(tmp_path):
    spawn(proxy_worker, 2, free_port(), tmp_path)
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for rank in ranks:
        whole, resumed = rank['whole'], rank['resumed']
        assert whole['updates'] == resumed['updates'] == STEPS
        assert resumed['ids'] == whole['ids'][SAVE_AT:]
        for after, before in zip(resumed['proxy'], whole['proxy'], strict=True):
            np.testing.assert_array_equal(after, before)
    # One proxy, learned from both ranks' sub-batches: the ranks' copies are the same,
    # though they started from different weights and selected from different data.
    assert ranks[0]['whole']['ids'] != ranks[1]['whole']['ids']
    for first, second in zip(ranks[0]['whole']['proxy'], ranks[1]['whole']['proxy'],
                             strict=True):
        np.testing.assert_array_equal(first, second)


def test_a_replica_needs_a_process_group_and_learns_only_in_one():
    assert not dist.is_initialized()
    proxy = ProxyScorer(ClassificationScorer(tiny_classifier(0), tiny_classifier(1),
                                             input_key=0, target_key=1))
    with pytest.raises(UsageError, match='process group'):
        proxy.replicate_across_ranks()
    proxy.replicated = True  # as a replica pickled into a scorer process would arrive
    with pytest.raises(UsageError, match='scoring="inline"'):
        proxy.learn(None, None, None)


class _LearnsAlone:
    """A learning scorer with no way to keep its ranks identical."""

    def __call__(self, batch, sample_ids, criterion):
        raise AssertionError('not called')

    def learn(self, batch, sample_ids, rows, *, count_flops=False, seed=None):
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_learning_scorer_that_cannot_replicate_is_refused_under_several_ranks(monkeypatch):
    # The world size is all that differs from the real two-rank run above.
    monkeypatch.setattr(algorithm_module, 'rank_and_world', lambda: (1, 2))
    algorithm = JESTAlgorithm(batch_size=10, reference=tiny_classifier(1))
    algorithm.scorer = _LearnsAlone()
    with pytest.raises(SettingTypeError, match=r"_LearnsAlone learns, and under 2 ranks .* "
                                               r"replicate_across_ranks\(\)"):
        algorithm._replicate_learning_scorer()

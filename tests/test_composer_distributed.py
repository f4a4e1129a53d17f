"""Composer checkpoints under DDP, written by rank 0 for every rank: real trainers on two gloo
ranks, with a proxy learner, adaptive pressure and a selection log (each rank's own state)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.composer_ranks import PROXY_SEED, SAVE_AT, STEPS, B, checkpoint_worker
from helpers.distributed import rendezvous, spawn
from helpers.models import tiny_classifier


@pytest.fixture(scope='module')
def two_rank_runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp('ranks')
    spawn(checkpoint_worker, 2, rendezvous(out), out)
    return [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]


def _assert_same_proxy(first: list, second: list) -> None:
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('path', ['algorithm', 'loader'])
def test_every_rank_resumes_exactly_from_the_checkpoint_rank_0_writes(two_rank_runs, path):
    for rank in two_rank_runs:
        whole, resumed = rank[path]['whole'], rank[path]['resumed']
        assert whole['updates'] == resumed['updates'] == STEPS
        assert resumed['ids'] == whole['ids'][SAVE_AT:]
        _assert_same_proxy(resumed['proxy'], whole['proxy'])
        assert resumed['policy'] == whole['policy']
        # The resumed run cut this rank's log back to the checkpoint and logged the rest again.
        assert len(whole['log']['step']) == STEPS * B
        assert resumed['rows_logged'] == (STEPS - SAVE_AT) * B
        assert resumed['log'] == whole['log']
    first, second = (rank[path]['whole'] for rank in two_rank_runs)
    # Each rank had a state of its own to resume: its proxy's and its policy's (its own
    # learnability); Composer wrote rank 0's checkpoint alone.
    assert first['ids'] != second['ids'] and first['policy'] != second['policy']


@pytest.mark.parametrize('path', ['algorithm', 'loader'])
def test_each_ranks_proxy_learns_from_its_own_sub_batches(two_rank_runs, path):
    # Both ranks' proxies start from the same weights, and end apart.
    start = [p.detach().flatten().tolist() for p in tiny_classifier(PROXY_SEED).parameters()]
    first, second = (rank[path]['whole']['proxy'] for rank in two_rank_runs)
    assert first != start and second != start and first != second

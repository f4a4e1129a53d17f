"""Multi-process selection with real torch.distributed (gloo, 2 processes on the CPU)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from helpers.data import write_mds
from helpers.distributed import (
    make_loader,
    map_dataset,
    rendezvous,
    run_steps,
    selection_worker,
    spawn,
    streaming_worker,
)
from jest_stream.distributed import own_rank_state
from jest_stream.errors import StateError


def _read(out_dir, world):
    return [json.loads((out_dir / f'rank{r}.json').read_text()) for r in range(world)]


def test_global_selection_equals_one_process_over_the_concatenated_super_batch(tmp_path):
    spawn(selection_worker, 2, rendezvous(tmp_path), tmp_path, 'global', 6, None, True)
    ranks = _read(tmp_path, 2)
    one = make_loader(map_dataset(130), world=1, global_super=40, global_batch=8,
                      scope='global', count_flops=True)
    single, _ = run_steps(one, 6)
    # 130 samples, global super-batch 40: 3 full ones and a partial of 10 (5 per rank).
    assert ranks[0]['len'] == ranks[1]['len'] == 4
    for step in range(6):
        assert ranks[0]['ids'][step] + ranks[1]['ids'][step] == single[step]
        assert len(set(ranks[0]['ids'][step]) & set(ranks[1]['ids'][step])) == 0
    metrics = ranks[0]['metrics']
    assert metrics['comm_bytes'] > 0 and metrics['comm_s'] >= 0
    # count_flops=True counts with global scope too: each rank scores its half of the
    # global super-batch (the last step's super-batch is a full one in both runs).
    assert one.metrics['score_flops'] > 0
    assert ranks[0]['metrics']['score_flops'] == ranks[1]['metrics']['score_flops'] \
        == one.metrics['score_flops'] // 2


def test_global_scope_resumes_exactly_on_a_different_world_size(tmp_path):
    spawn(selection_worker, 2, rendezvous(tmp_path), tmp_path, 'global', 7, 3)
    ranks = _read(tmp_path, 2)
    resumed = make_loader(map_dataset(130), world=1, global_super=40, global_batch=8,
                          scope='global')
    resumed.load_state_dict(ranks[0]['state'])
    after, _ = run_steps(resumed, 4)
    uninterrupted = [a + b for a, b in zip(ranks[0]['ids'], ranks[1]['ids'], strict=True)]
    assert after == uninterrupted[3:]


def test_rank_scope_selects_from_each_ranks_own_partition(tmp_path):
    spawn(selection_worker, 2, rendezvous(tmp_path), tmp_path, 'rank', 4, None)
    ranks = _read(tmp_path, 2)
    for step in range(4):
        assert len(ranks[0]['ids'][step]) == len(ranks[1]['ids'][step]) == 4
        assert not set(ranks[0]['ids'][step]) & set(ranks[1]['ids'][step])
    assert 'comm_bytes' not in ranks[0]['metrics']


def test_streaming_ranks_draw_equal_numbers_of_super_batches(tmp_path):
    mds = write_mds(tmp_path / 'mds', 103)
    spawn(streaming_worker, 2, rendezvous(tmp_path), tmp_path, str(mds))
    for scope in ('rank', 'global'):
        ranks = [r[scope] for r in _read(tmp_path, 2)]
        for epoch in range(2):
            counts = [len(r['epochs'][epoch]) for r in ranks]
            assert counts[0] == counts[1] == ranks[0]['len'], scope
        if scope == 'rank':
            assert all(len(ids) == 4 for r in ranks for ids in r['epochs'][0])


def test_a_state_saved_on_several_ranks_resumes_on_another_number_only_when_all_agree():
    same = {'version': 1, 'weights': torch.ones(3), 'counts': [1, 2], 'ids': np.arange(2)}
    assert own_rank_state(same, 'state') is same  # one rank's: taken as it is
    agreeing = {'ranks': [same, copy.deepcopy(same)]}
    assert own_rank_state(agreeing, 'state') is agreeing['ranks'][0]  # on 1 rank, not 2
    for key, other in (('weights', torch.tensor([1.0, 1.0, 2.0])), ('counts', [1, 3]),
                       ('ids', np.arange(1, 3)), ('version', 1.0)):
        differing = {'ranks': [same, {**same, key: other}]}
        with pytest.raises(StateError, match=r'the loader state was saved on 2 ranks, each '
                                             r'with a state of its own .* resume on 2 ranks'):
            own_rank_state(differing, 'the loader state')

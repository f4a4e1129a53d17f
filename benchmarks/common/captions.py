"""Captions for the contrastive task: a tiny vocabulary, tokens, and the captioned pool as MDS.

Every pool image gets a caption made from a template and an adjective (``"a photo of
the worn sneaker"``) and the name of its *noisy* label: :func:`benchmarks.common.data.prepare`
replaced 40% of the pool's labels by a random other class, so 40% of the image-caption
pairs are mismatched. :func:`prepare_captions` writes that pool once as MDS shards
(``image``, ``text``: token ids, ``label``: the captioned class, ``clean_label``,
``mismatched``, ``train_index``) for a ``StreamingDataset``; the clean split is captioned
in memory (it trains the reference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.common.data import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    MARKER,
    N_CLASSES,
    PreparedData,
    build_atomically,
    read_columns,
    read_marker,
    write_mds,
)

__all__ = [
    'ADJECTIVES',
    'CAPTION_COLUMNS',
    'CLASS_PHRASES',
    'CaptionData',
    'MAX_TOKENS',
    'TEMPLATES',
    'VOCABULARY',
    'caption',
    'class_prompt_tokens',
    'pool_captions',
    'prepare_captions',
    'random_captions',
    'tokenize',
]

# 'T-shirt/top' -> 't-shirt or top': one phrase per class, lower case, words split by spaces.
CLASS_PHRASES = tuple(name.lower().replace('/', ' or ') for name in CLASS_NAMES)
TEMPLATES = (
    'a photo of a {cls}',
    'a {adj} {cls}',
    'a photo of the {adj} {cls}',
    'a picture of a {cls}',
    'an image of a {adj} {cls}',
    'the {cls}',
    'a close-up photo of a {cls}',
    'a {adj} {cls} for sale',
)
ADJECTIVES = ('small', 'large', 'dark', 'light', 'new', 'old', 'plain', 'striped', 'cheap',
              'worn', 'clean', 'soft')
PAD = '<pad>'
VOCABULARY = (PAD,) + tuple(sorted(
    {word for template in TEMPLATES for word in template.split() if '{' not in word}
    | {word for phrase in CLASS_PHRASES for word in phrase.split()} | set(ADJECTIVES)))
_TOKEN_IDS = {word: i for i, word in enumerate(VOCABULARY)}


def caption(cls: int, template: int, adjective: int) -> str:
    """The caption of class ``cls`` with template ``template`` and adjective ``adjective``."""
    return TEMPLATES[template].format(cls=CLASS_PHRASES[cls], adj=ADJECTIVES[adjective])


MAX_TOKENS = max(len(caption(c, t, a).split()) for c in range(N_CLASSES)
                 for t in range(len(TEMPLATES)) for a in range(len(ADJECTIVES)))
CAPTION_COLUMNS = {
    'image': f'ndarray:uint8:{IMAGE_SHAPE[0]},{IMAGE_SHAPE[1]}',
    'text': f'ndarray:int32:{MAX_TOKENS}',
    'label': 'int',
    'clean_label': 'int',
    'mismatched': 'int',
    'train_index': 'int',
}
# Bumped whenever the captions, the vocabulary or the columns change.
FORMAT_VERSION = 1
# Random streams of the captions (prepare() of the pool uses 0 and 1).
_POOL_CAPTION_STREAM = 3
_CLEAN_CAPTION_STREAM = 4


def tokenize(text: str) -> np.ndarray:
    """Token ids of a caption, padded with 0 to :data:`MAX_TOKENS`.

    Args:
        text (str): Words of :data:`VOCABULARY` separated by spaces.

    Returns:
        np.ndarray: int32 ``[MAX_TOKENS]``.
    """
    words = text.split()
    unknown = [w for w in words if w not in _TOKEN_IDS]
    if unknown:
        raise ValueError(f'{text!r} has words outside the vocabulary: {unknown}')
    if len(words) > MAX_TOKENS:
        raise ValueError(f'{text!r} has {len(words)} words, more than MAX_TOKENS={MAX_TOKENS}')
    ids = np.zeros(MAX_TOKENS, dtype=np.int32)
    ids[:len(words)] = [_TOKEN_IDS[w] for w in words]
    return ids


def random_captions(classes: np.ndarray, *, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Token ids of one caption per class label, template and adjective drawn at random.

    Args:
        classes (np.ndarray): int ``[N]`` class of each caption.
        seed (int | np.random.SeedSequence): Seed of the private generator.

    Returns:
        np.ndarray: int32 ``[N, MAX_TOKENS]``.
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, len(TEMPLATES), size=len(classes))
    adjectives = rng.integers(0, len(ADJECTIVES), size=len(classes))
    table = {(c, t, a): tokenize(caption(c, t, a)) for c in range(N_CLASSES)
             for t in range(len(TEMPLATES)) for a in range(len(ADJECTIVES))}
    return np.stack([table[int(c), int(t), int(a)]
                     for c, t, a in zip(classes, templates, adjectives, strict=True)])


def pool_captions(labels: np.ndarray, data_seed: int) -> np.ndarray:
    """The pool's captions: :func:`random_captions` of its (noisy) labels, from a fixed stream.

    The captioned MDS pool holds exactly these, row for row, so code that has the pool's
    labels can rebuild its texts without reading the shards.

    Args:
        labels (np.ndarray): int ``[N]`` the pool's ``label`` column, in stored order.
        data_seed (int): The seed :func:`benchmarks.common.data.prepare` was given.

    Returns:
        np.ndarray: int32 ``[N, MAX_TOKENS]``.
    """
    return random_captions(labels, seed=np.random.SeedSequence([data_seed, _POOL_CAPTION_STREAM]))


def class_prompt_tokens() -> Tensor:
    """Every distinct prompt of every class, for zero-shot classification.

    Returns:
        LongTensor[N_CLASSES, P, MAX_TOKENS]: Templates with an adjective appear once per
        adjective, the others once.
    """
    prompts = [sorted({caption(c, t, a) for t in range(len(TEMPLATES))
                       for a in range(len(ADJECTIVES))}) for c in range(N_CLASSES)]
    return torch.as_tensor(np.stack([np.stack([tokenize(p) for p in class_prompts])
                                     for class_prompts in prompts])).long()


@dataclass(frozen=True)
class CaptionData:
    """The captioned pool (MDS) and the captioned clean split (in memory).

    Attributes:
        pool_dir (Path): MDS dataset of the pool (:data:`CAPTION_COLUMNS`).
        n_pool (int): Pairs in the pool.
        n_mismatched (int): Pool pairs whose caption names another class.
        clean_images (np.ndarray): uint8 ``[N, 28, 28]`` of the clean split.
        clean_text (np.ndarray): int32 ``[N, MAX_TOKENS]`` their (correct) captions.
        clean_labels (np.ndarray): int64 ``[N]``.
    """

    pool_dir: Path
    n_pool: int
    n_mismatched: int
    clean_images: np.ndarray
    clean_text: np.ndarray
    clean_labels: np.ndarray

    def summary(self) -> dict[str, Any]:
        """Counts and paths as JSON-ready values."""
        return {'pool_dir': str(self.pool_dir), 'n_pool': self.n_pool,
                'n_mismatched': self.n_mismatched, 'n_clean': int(self.clean_labels.size),
                'vocabulary': len(VOCABULARY), 'max_tokens': MAX_TOKENS,
                'templates': list(TEMPLATES), 'adjectives': list(ADJECTIVES)}


def prepare_captions(data: PreparedData, root: str | Path, *, progress: bool = True
                     ) -> CaptionData:
    """Caption the noisy pool of :func:`benchmarks.common.data.prepare` as MDS, once.

    A caption names the pool's (noisy) ``label``, so the pairs whose label was corrupted
    are mismatched. ``root/prepared.json`` records what was built (the pool's own marker,
    the caption format); a later call with the same inputs only reads the clean split.

    Args:
        data (PreparedData): The prepared Fashion-MNIST pool and clean split.
        root (str | Path): Output folder (holds ``pool/``).
        progress (bool): Show a progress bar while writing.

    Returns:
        CaptionData: The pool's location and the captioned clean split.
    """
    root = Path(root)
    source = json.loads((data.root / MARKER).read_text())
    params = {'format_version': FORMAT_VERSION, 'source': source, 'vocabulary': list(VOCABULARY)}
    clean = read_columns(data.clean_dir, ['image', 'label'])
    clean_text = random_captions(clean['label'],
                                 seed=np.random.SeedSequence([data.seed, _CLEAN_CAPTION_STREAM]))
    marker = read_marker(root)
    if marker is None or marker.get('params') != params \
            or not (root / 'pool' / 'index.json').is_file():
        marker = _build(root, params, data, progress=progress)
    return CaptionData(pool_dir=root / 'pool', n_pool=marker['counts']['pool'],
                       n_mismatched=marker['counts']['mismatched'],
                       clean_images=clean['image'], clean_text=clean_text,
                       clean_labels=clean['label'].astype(np.int64))


def _build(root: Path, params: dict[str, Any], data: PreparedData, *, progress: bool
           ) -> dict[str, Any]:
    pool = read_columns(data.pool_dir, ['image', 'label', 'clean_label', 'train_index'])
    text = pool_captions(pool['label'], data.seed)
    mismatched = (pool['label'] != pool['clean_label']).astype(np.int64)

    def write(building: Path) -> dict[str, Any]:
        write_mds(building / 'pool', CAPTION_COLUMNS, {**pool, 'text': text,
                                                       'mismatched': mismatched},
                  size_limit=1 << 22, desc='captioned pool', progress=progress)
        return {'params': params,
                'counts': {'pool': int(len(text)), 'mismatched': int(mismatched.sum())}}

    return build_atomically(root, write)

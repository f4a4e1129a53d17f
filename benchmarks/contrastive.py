"""A two-tower image-text task on Fashion-MNIST: captions, models, loss, zero-shot accuracy.

The contrastive half of ``benchmarks.learning_efficiency``. Every pool image gets a
caption made from a template and an adjective (``"a photo of the worn sneaker"``) and
the name of its *noisy* label: :func:`benchmarks.fashion_mnist.prepare` replaced 40%
of the pool's labels by a random other class, so 40% of the image-caption pairs are
mismatched. :func:`prepare_captions` writes that pool once as MDS shards (``image``,
``text``: token ids, ``label``: the captioned class, ``clean_label``, ``mismatched``,
``train_index``) for a ``StreamingDataset``; the clean split is captioned in memory
(it trains the reference).

Models (:class:`TwoTower`): an image tower (two strided convolutions, adaptive average
pooling, so it accepts any resolution, two linear layers) and a text tower (mean of
token embeddings, one linear layer), both L2-normalised, with a learned temperature and
bias, trained with the sigmoid (SigLIP) loss. Zero-shot accuracy classifies test images
by the nearest class embedding, the mean of the embeddings of every prompt of the class.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmarks.fashion_mnist import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    N_CLASSES,
    PreparedData,
    read_columns,
    to_float_images,
)
from jest_stream.losses import sigmoid_pair_losses

__all__ = [
    'ADJECTIVES',
    'CAPTION_COLUMNS',
    'CLASS_PHRASES',
    'CaptionData',
    'ConvTrunk',
    'ImageTower',
    'MAX_TOKENS',
    'TEMPLATES',
    'TextTower',
    'TwoTower',
    'VOCABULARY',
    'caption',
    'class_prompt_tokens',
    'make_two_tower',
    'pool_captions',
    'prepare_captions',
    'random_captions',
    'sigmoid_loss',
    'tokenize',
    'train_two_tower',
    'zero_shot_accuracy',
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
MARKER = 'prepared.json'
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
        data_seed (int): The seed :func:`benchmarks.fashion_mnist.prepare` was given.

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


# Models


class ConvTrunk(nn.Module):
    """Two strided 4x4 convolutions and adaptive average pooling to a fixed grid.

    Strided convolutions rather than max-pooling keep it fast on a CPU; the pooling to a
    ``grid x grid`` map makes the output size independent of the input resolution, so
    the same weights run on 28x28 and on 14x14 images (Flexi scoring and mixed-resolution
    training).

    Args:
        channels (tuple[int, int]): Channels of the two convolutions.
        grid (int): Side of the pooled map.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), grid: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=4, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_features = channels[1] * grid * grid

    def forward(self, x: Tensor) -> Tensor:
        """Features ``Tensor[B, out_features]`` of normalised images ``Tensor[B, 1, H, W]``."""
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.pool(x).flatten(1)


class ImageTower(nn.Module):
    """:class:`ConvTrunk`, a hidden layer, a projection to ``dim``; L2-normalised output.

    Args:
        dim (int): Embedding width.
        hidden (int): Width of the hidden layer.
    """

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = ConvTrunk()
        self.fc1 = nn.Linear(self.trunk.out_features, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings ``Tensor[B, dim]`` of normalised float images ``Tensor[B, 1, H, W]``."""
        return F.normalize(self.fc2(F.relu(self.fc1(self.trunk(images)))), dim=-1)


class TextTower(nn.Module):
    """Mean of the token embeddings (padding ignored), a linear layer; L2-normalised.

    Args:
        dim (int): Embedding width.
        width (int): Width of the token embeddings.
    """

    def __init__(self, dim: int = 32, width: int = 32) -> None:
        super().__init__()
        self.tokens = nn.EmbeddingBag(len(VOCABULARY), width, mode='mean', padding_idx=0)
        self.proj = nn.Linear(width, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """Embeddings ``Tensor[B, dim]`` of token ids ``Tensor[B, MAX_TOKENS]`` (0 pads)."""
        return F.normalize(self.proj(self.tokens(tokens.long())), dim=-1)


class TwoTower(nn.Module):
    """Image and text towers with a learned temperature and bias (sigmoid loss).

    The temperature is stored as its log, the bias as is; their initial values are the
    SigLIP ones (``t = 10``, ``c = -10``), which start the loss low for a batch of
    mostly negative pairs.

    Args:
        dim (int): Embedding width of both towers.
    """

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.image = ImageTower(dim)
        self.text = TextTower(dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def embed_images(self, images: Tensor) -> Tensor:
        """Image embeddings of uint8 pixels ``[B, H, W]`` (any resolution)."""
        return self.image(to_float_images(images))

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What :class:`jest_stream.ContrastiveScorer` expects.

        Args:
            images (Tensor): uint8 pixels ``[B, H, W]`` (28x28, or smaller when scored at
                low resolution).
            tokens (Tensor): Token ids ``[B, MAX_TOKENS]``.

        Returns:
            tuple: ``(image_emb [B, d], text_emb [B, d], temperature, bias)``.
        """
        return (self.embed_images(images), self.text(tokens), self.log_temperature.exp(),
                self.bias)


def make_two_tower(seed: int, *, dim: int = 32) -> TwoTower:
    """A :class:`TwoTower` whose initial weights depend only on ``seed`` (global RNG untouched)."""
    model = TwoTower(dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.EmbeddingBag):
                nn.init.normal_(module.weight, generator=generator)
                module.weight[0].zero_()
    return model


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, temperature: Tensor, bias: Tensor
                 ) -> Tensor:
    """The SigLIP loss of a batch: the sum of its pair losses over the batch size."""
    return sigmoid_pair_losses(image_emb, text_emb, temperature, bias).sum() / image_emb.shape[0]


@torch.no_grad()
def zero_shot_accuracy(model: TwoTower, images: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                       *, batch_size: int = 2000) -> float:
    """Accuracy of classifying images by the nearest class embedding.

    A class embedding is the normalised mean of the text embeddings of all its prompts
    (:func:`class_prompt_tokens`). The model's training mode is restored afterwards.

    Args:
        model (TwoTower): The model.
        images (np.ndarray | Tensor): uint8 ``[N, 28, 28]``.
        labels (np.ndarray | Tensor): int ``[N]`` true classes.
        batch_size (int): Images per forward pass.

    Returns:
        float: Fraction classified correctly.
    """
    was_training = model.training
    model.eval()
    try:
        prompts = class_prompt_tokens()
        text = model.text(prompts.flatten(0, 1)).reshape(*prompts.shape[:2], -1)
        classes = F.normalize(text.mean(1), dim=-1)
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        correct = 0
        for start in range(0, len(labels), batch_size):
            emb = model.embed_images(images[start:start + batch_size])
            correct += int(((emb @ classes.T).argmax(1) == labels[start:start + batch_size]).sum())
        return correct / len(labels)
    finally:
        model.train(was_training)


# Data


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
    """Caption the noisy pool of :func:`benchmarks.fashion_mnist.prepare` as MDS, once.

    A caption names the pool's (noisy) ``label``, so the pairs whose label was corrupted
    are mismatched. ``root/prepared.json`` records what was built (the pool's own marker,
    the caption format); a later call with the same inputs only reads the clean split.
    The build goes to a temporary sibling folder renamed into place.

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
    try:
        marker = json.loads((root / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        marker = None
    if marker is None or marker.get('params') != params \
            or not (root / 'pool' / 'index.json').is_file():
        marker = _build(root, params, data, progress=progress)
    return CaptionData(pool_dir=root / 'pool', n_pool=marker['counts']['pool'],
                       n_mismatched=marker['counts']['mismatched'],
                       clean_images=clean['image'], clean_text=clean_text,
                       clean_labels=clean['label'].astype(np.int64))


def _build(root: Path, params: dict[str, Any], data: PreparedData, *, progress: bool
           ) -> dict[str, Any]:
    from streaming import MDSWriter

    pool = read_columns(data.pool_dir, ['image', 'label', 'clean_label', 'train_index'])
    text = pool_captions(pool['label'], data.seed)
    mismatched = (pool['label'] != pool['clean_label']).astype(np.int64)
    marker = {'params': params,
              'counts': {'pool': int(len(text)), 'mismatched': int(mismatched.sum())}}
    root.mkdir(parents=True, exist_ok=True)
    building = root / f'.pool.building-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    try:
        with MDSWriter(out=str(building), columns=CAPTION_COLUMNS, size_limit=1 << 22,
                       compression=None) as writer:
            for i in tqdm(range(len(text)), desc='captioned pool', unit='pair',
                          disable=not progress, mininterval=0.5):
                writer.write({'image': pool['image'][i], 'text': text[i],
                              'label': int(pool['label'][i]),
                              'clean_label': int(pool['clean_label'][i]),
                              'mismatched': int(mismatched[i]),
                              'train_index': int(pool['train_index'][i])})
        shutil.rmtree(root / 'pool', ignore_errors=True)
        building.rename(root / 'pool')
        (root / MARKER).write_text(json.dumps(marker, indent=2) + '\n')
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return marker


def train_two_tower(model: TwoTower, images: np.ndarray, text: np.ndarray, *, steps: int,
                    batch_size: int, lr: float, seed: int, progress: bool = False,
                    desc: str = 'two-tower') -> list[float]:
    """Train with Adam and the sigmoid loss on in-memory pairs (the reference's training).

    Args:
        model (TwoTower): Trained in place.
        images (np.ndarray): uint8 ``[N, 28, 28]``.
        text (np.ndarray): int ``[N, MAX_TOKENS]`` the matching captions.
        steps (int): Optimizer steps.
        batch_size (int): Pairs per step (at most ``N``).
        lr (float): Adam learning rate.
        seed (int): Seed of the order of the pairs (reshuffled every pass).
        progress (bool): Show a progress bar.
        desc (str): Its label.

    Returns:
        list[float]: The loss of every step.
    """
    n = len(images)
    if len(text) != n or not 0 < batch_size <= n:
        raise ValueError(f'{n} images, {len(text)} captions and batch_size={batch_size}: need '
                         f'one caption per image and 0 < batch_size <= {n}')
    rng = np.random.default_rng(seed)
    images_t, text_t = torch.as_tensor(images), torch.as_tensor(text)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    order, position, losses = rng.permutation(n), 0, []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if position + batch_size > n:
            order, position = rng.permutation(n), 0
        rows = torch.from_numpy(order[position:position + batch_size])
        position += batch_size
        loss = sigmoid_loss(*model(images_t[rows], text_t[rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses

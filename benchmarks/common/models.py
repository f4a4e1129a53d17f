"""The benchmarks' models: small CNNs, a two-tower image-text model and a FlexiViT.

Every ``make_*`` function builds its model with the global random state saved and
restored around the constructor, and draws the initial weights from a private generator
seeded with its ``seed`` (:func:`seeded_init`): building a model leaves the global random
state as it was, and every method of a benchmark seed starts from the same weights.
All are sized to train in seconds on two CPU cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common.captions import VOCABULARY
from benchmarks.common.data import N_CLASSES, to_float_images
from jest_stream import sigmoid_pair_losses
from jest_stream.flexi import FlexiPatchEmbed, resize_position_embeddings

__all__ = [
    'PROXY_CHANNELS',
    'PROXY_HIDDEN',
    'ConvTrunk',
    'FlexiViT',
    'ImageTower',
    'PooledCNN',
    'SmallCNN',
    'TextTower',
    'TinyClassifier',
    'TwoTower',
    'count_parameters',
    'make_classifier',
    'make_cnn',
    'make_pooled_cnn',
    'make_proxy_classifier',
    'make_proxy_two_tower',
    'make_two_tower',
    'make_vit',
    'seeded_init',
    'sigmoid_loss',
]


Model = TypeVar('Model', bound=nn.Module)


def _construct(make: Callable[[], Model]) -> Model:
    # torch's layers draw default weights from the global generator; put its state back.
    with torch.random.fork_rng(devices=[]):
        return make()


def seeded_init(make: Callable[[], Model], seed: int) -> Model:
    """``make()`` with He-normal convolution and linear weights, zero biases, normal token
    embeddings, drawn from a private generator; the global random state is left as it was.

    Args:
        make (Callable): Builds the model.
        seed (int): Seed of the private generator every weight is drawn from.

    Returns:
        nn.Module: The model.
    """
    model = _construct(make)
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


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Classifiers


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (16 and 32 channels, each then 2x2 max-pooling), two linear layers.

    About 80k parameters for 28x28 inputs: the learner of the throughput benchmarks.

    Args:
        n_classes (int): Number of outputs.
        hidden (int): Width of the hidden linear layer.
    """

    def __init__(self, n_classes: int = N_CLASSES, hidden: int = 48) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``Tensor[B, n_classes]`` of normalised images ``Tensor[B, 1, 28, 28]``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def make_cnn(seed: int, *, n_classes: int = N_CLASSES, hidden: int = 48) -> SmallCNN:
    """A :class:`SmallCNN` whose initial weights depend only on ``seed``."""
    model = seeded_init(lambda: SmallCNN(n_classes=n_classes, hidden=hidden), seed)
    with torch.no_grad():
        # Small initial logits: the first losses are close to log(n_classes) for every example.
        model.fc2.weight.mul_(1.0 / math.sqrt(hidden))
    return model


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


class TinyClassifier(nn.Module):
    """:class:`ConvTrunk`, a hidden layer and an output layer.

    About 40k parameters; a forward pass over 320 images takes a few milliseconds on one
    CPU core: learner and reference of the learning-efficiency classification task, and
    (with ``out_features`` the embedding width) the image tower of :class:`TwoTower`.

    Args:
        hidden (int): Width of the hidden layer.
        out_features (int): Outputs: the class logits by default.
        channels (tuple[int, int]): Channels of the trunk's two convolutions (smaller ones
            make a proxy learner: :func:`make_proxy_classifier`).
    """

    def __init__(self, hidden: int = 64, out_features: int = N_CLASSES,
                 channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.trunk = ConvTrunk(channels)
        self.fc1 = nn.Linear(self.trunk.out_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs ``Tensor[B, out_features]`` of normalised images ``Tensor[B, 1, H, W]``."""
        return self.fc2(F.relu(self.fc1(self.trunk(x))))


def make_classifier(seed: int, *, hidden: int = 64, channels: tuple[int, int] = (16, 32)
                    ) -> TinyClassifier:
    """A :class:`TinyClassifier` whose initial weights depend only on ``seed``."""
    model = seeded_init(lambda: TinyClassifier(hidden, channels=channels), seed)
    with torch.no_grad():
        # Small initial logits: every example starts near loss log(10).
        model.fc2.weight.mul_(0.1)
    return model


#: The proxy learners' sizes: a quarter of the learners' channels and half their widths.
PROXY_CHANNELS = (4, 8)
PROXY_HIDDEN = 32


def make_proxy_classifier(seed: int) -> TinyClassifier:
    """A :class:`TinyClassifier` with a quarter of the channels and half the hidden width:
    about a tenth of the learner's parameters and FLOPs, the classification task's proxy
    learner (``jest_stream.ProxyScorer``)."""
    return make_classifier(seed, hidden=PROXY_HIDDEN, channels=PROXY_CHANNELS)


class PooledCNN(nn.Module):
    """Three 3x3 conv layers (16, 32, 64 channels), global average pooling, one linear layer.

    The global pooling makes it accept any resolution, so it can score (and train) on
    downsampled images: the CNN of the Flexi benchmark.

    Args:
        n_classes (int): Number of outputs.
    """

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.head = nn.Linear(64, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``Tensor[B, n_classes]`` of normalised images ``Tensor[B, 1, H, W]`` (H >= 4)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


def make_pooled_cnn(seed: int) -> PooledCNN:
    """A :class:`PooledCNN` whose initial weights depend only on ``seed``."""
    model = seeded_init(PooledCNN, seed)
    with torch.no_grad():
        model.head.weight.mul_(0.1)
    return model


# Two towers


class ImageTower(TinyClassifier):
    """:class:`TinyClassifier` projecting to ``dim`` instead of the classes; L2-normalised.

    Args:
        dim (int): Embedding width.
        hidden (int): Width of the hidden layer.
        channels (tuple[int, int]): Channels of the trunk's two convolutions.
    """

    def __init__(self, dim: int = 32, hidden: int = 64,
                 channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__(hidden, out_features=dim, channels=channels)

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings ``Tensor[B, dim]`` of normalised float images ``Tensor[B, 1, H, W]``."""
        return F.normalize(super().forward(images), dim=-1)


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
        hidden (int): Width of the image tower's hidden layer.
        channels (tuple[int, int]): Channels of the image tower's convolutions.
        width (int): Width of the text tower's token embeddings.
    """

    def __init__(self, dim: int = 32, *, hidden: int = 64, channels: tuple[int, int] = (16, 32),
                 width: int = 32) -> None:
        super().__init__()
        self.image = ImageTower(dim, hidden, channels)
        self.text = TextTower(dim, width)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def embed_images(self, images: Tensor) -> Tensor:
        """Image embeddings of uint8 pixels ``[B, H, W]`` (any resolution)."""
        return self.image(to_float_images(images))

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What :class:`jest_stream.ContrastiveScorer` and ``jest_stream.annotate`` expect.

        Args:
            images (Tensor): uint8 pixels ``[B, H, W]`` (28x28, or smaller when scored at
                low resolution).
            tokens (Tensor): Token ids ``[B, MAX_TOKENS]``.

        Returns:
            tuple: ``(image_emb [B, d], text_emb [B, d], temperature, bias)``.
        """
        return (self.embed_images(images), self.text(tokens), self.log_temperature.exp(),
                self.bias)


def make_two_tower(seed: int, *, dim: int = 32, hidden: int = 64,
                   channels: tuple[int, int] = (16, 32), width: int = 32) -> TwoTower:
    """A :class:`TwoTower` whose initial weights depend only on ``seed``."""
    return seeded_init(lambda: TwoTower(dim, hidden=hidden, channels=channels, width=width),
                       seed)


def make_proxy_two_tower(seed: int) -> TwoTower:
    """A :class:`TwoTower` with a quarter of the image tower's channels, half its hidden
    width and half the embedding widths: the contrastive task's proxy learner."""
    return make_two_tower(seed, dim=16, hidden=PROXY_HIDDEN, channels=PROXY_CHANNELS, width=16)


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, temperature: Tensor, bias: Tensor
                 ) -> Tensor:
    """The SigLIP loss of a batch: the sum of its pair losses over the batch size."""
    return sigmoid_pair_losses(image_emb, text_emb, temperature, bias).sum() / image_emb.shape[0]


# FlexiViT


class _Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then a GELU MLP.

    Attention is written as two matrix products (not ``F.scaled_dot_product_attention``)
    so that ``FlopCounterMode`` counts it on the CPU too.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = (self.qkv(self.norm1(x))
                   .reshape(batch, tokens, 3, self.heads, dim // self.heads)
                   .permute(2, 0, 3, 1, 4))
        attention = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        mixed = (attention.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(mixed)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FlexiViT(nn.Module):
    """A ViT whose patch size is an argument of ``forward``.

    The patch embedding is :class:`jest_stream.flexi.FlexiPatchEmbed` (weights stored at
    the base patch size, PI-resized for others) and the position embeddings, learned on
    the base grid, are resized bilinearly to the grid of the patch size in use. On 28x28
    images patch 4 gives 49 tokens, patch 7 gives 16.

    Args:
        image_size (int): Side of the (square) input images.
        in_channels (int): Image channels.
        n_classes (int): Number of outputs.
        dim (int): Token width.
        depth (int): Transformer blocks.
        heads (int): Attention heads (must divide ``dim``).
        mlp_ratio (int): Hidden width of the MLPs, in multiples of ``dim``.
        base_patch_size (int): Patch size the patch-embedding and position-embedding
            weights are stored at.
        patch_size (int, optional): Default patch size at run time; the base one by default.
    """

    def __init__(self, *, image_size: int = 28, in_channels: int = 1,
                 n_classes: int = N_CLASSES, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 2, base_patch_size: int = 4,
                 patch_size: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f'heads={heads} must divide dim={dim}')
        self.image_size = image_size
        self.patch_embed = FlexiPatchEmbed(in_channels=in_channels, dim=dim,
                                           base_patch_size=base_patch_size,
                                           patch_size=patch_size)
        self.base_grid = self.patch_embed.grid_size(image_size, image_size, base_patch_size)
        self.position = nn.Parameter(torch.zeros(self.base_grid[0] * self.base_grid[1], dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """Logits of a batch of images at a patch size.

        Args:
            images (Tensor[B, in_channels, H, W]): Normalised float images.
            patch_size (int, optional): Patch size (must divide H and W); the default one
                otherwise.

        Returns:
            Tensor[B, n_classes]: Logits.
        """
        tokens = self.patch_embed(images, patch_size)
        grid = self.patch_embed.grid_size(images.shape[2], images.shape[3], patch_size)
        x = tokens + resize_position_embeddings(self.position, self.base_grid, grid)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def make_vit(seed: int, **kwargs) -> FlexiViT:
    """A :class:`FlexiViT` whose initial weights depend only on ``seed``.

    Linear weights and position embeddings are drawn from a truncated normal (std 0.02)
    with a private generator; the global random state is left as it was.

    Args:
        seed (int): Seed of the initialisation.
        **kwargs: Arguments of :class:`FlexiViT`.

    Returns:
        FlexiViT: The model, in training mode, on the CPU.
    """
    model = _construct(lambda: FlexiViT(**kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.patch_embed.reset_parameters(generator)
        nn.init.trunc_normal_(model.position, std=0.02, a=-0.04, b=0.04, generator=generator)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04,
                                      generator=generator)
                nn.init.zeros_(module.bias)
        # A zero head starts every example at loss log(n_classes).
        nn.init.zeros_(model.head.weight)
    return model

"""A small FlexiViT for 28x28 grayscale images: the patch size is chosen at every call.

The patch embedding is :class:`jest_stream.flexi.FlexiPatchEmbed` (weights stored at
patch 4, PI-resized for other sizes) and the position embeddings, learned on the 7x7 grid
of patch 4, are resized bilinearly to the grid of the patch size in use. On 28x28 images
patch 4 gives 49 tokens, patch 7 gives 16, patch 14 gives 4.

Attention is written as two matrix products (not ``F.scaled_dot_product_attention``) so
that ``FlopCounterMode`` counts it on the CPU too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.fashion_mnist import N_CLASSES
from jest_stream.flexi import FlexiPatchEmbed, resize_position_embeddings

__all__ = ['FlexiViT', 'make_vit']


class _Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then a GELU MLP."""

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
    with a private generator, so the global random state is neither read nor advanced.

    Args:
        seed (int): Seed of the initialisation.
        **kwargs: Arguments of :class:`FlexiViT`.

    Returns:
        FlexiViT: The model, in training mode, on the CPU.
    """
    model = FlexiViT(**kwargs)
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


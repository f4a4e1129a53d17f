"""A small CNN for 28x28 grayscale images, and the plain loops that train and evaluate it.

Sized to train in seconds on two CPU cores: learner and reference of the
Fashion-MNIST benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmarks.fashion_mnist import N_CLASSES, to_float_images

__all__ = ['SmallCNN', 'make_cnn', 'count_parameters', 'train_classifier', 'evaluate']


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (16 and 32 channels, each then 2x2 max-pooling), two linear layers.

    About 80k parameters for 28x28 inputs.

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
        """Logits of a batch of images.

        Args:
            x (Tensor[B, 1, 28, 28]): Normalised float images.

        Returns:
            Tensor[B, n_classes]: Logits.
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def make_cnn(seed: int, *, n_classes: int = N_CLASSES, hidden: int = 48) -> SmallCNN:
    """A :class:`SmallCNN` whose initial weights depend only on ``seed``.

    The weights are drawn from a private generator, so building a model neither reads
    nor advances the global random state.

    Args:
        seed (int): Seed of the initialisation.
        n_classes (int): Number of outputs.
        hidden (int): Width of the hidden linear layer.

    Returns:
        SmallCNN: The model, in training mode, on the CPU.
    """
    model = SmallCNN(n_classes=n_classes, hidden=hidden)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # He initialisation suits the ReLUs; the last layer is re-scaled below.
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
                nn.init.zeros_(module.bias)
        # Small initial logits: the first losses are close to log(n_classes) for every example.
        model.fc2.weight.mul_(1.0 / math.sqrt(hidden))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int,
                     batch_size: int, lr: float, seed: int, weight_decay: float = 0.0,
                     transform: Callable[[Tensor], Tensor] = to_float_images,
                     progress: bool = False, desc: str = 'train') -> list[float]:
    """Train with Adam on in-memory arrays, reshuffling each pass with a private generator.

    Args:
        model (nn.Module): The classifier; trained in place.
        images (np.ndarray): Inputs ``[N, ...]`` (uint8 pixels for the default transform).
        labels (np.ndarray): Integer targets ``[N]``.
        steps (int): Optimizer steps.
        batch_size (int): Examples per step (at most ``N``).
        lr (float): Adam learning rate.
        seed (int): Seed of the order in which examples are drawn.
        weight_decay (float): Decoupled weight decay (AdamW).
        transform (Callable): Turns a batch of ``images`` (as a Tensor) into model inputs.
        progress (bool): Show a progress bar.
        desc (str): Label of the progress bar.

    Returns:
        list[float]: The training loss of every step.
    """
    n = len(labels)
    if len(images) != n:
        raise ValueError(f'{len(images)} images but {n} labels')
    if not 0 < batch_size <= n:
        raise ValueError(f'batch_size={batch_size} must be in 1..{n} (the number of examples)')
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    images_t = torch.as_tensor(images)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    model.train()
    order = rng.permutation(n)
    position = 0
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if position + batch_size > n:
            order, position = rng.permutation(n), 0
        rows = torch.from_numpy(order[position:position + batch_size])
        position += batch_size
        loss = F.cross_entropy(model(transform(images_t[rows])), labels_t[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 1000,
             transform: Callable[[Tensor], Tensor] = to_float_images) -> float:
    """Top-1 accuracy; the model's training mode is restored afterwards.

    Args:
        model (nn.Module): The classifier.
        images (np.ndarray): Inputs ``[N, ...]``.
        labels (np.ndarray): Integer targets ``[N]``.
        batch_size (int): Examples per forward pass.
        transform (Callable): Turns a batch of ``images`` (as a Tensor) into model inputs.

    Returns:
        float: Fraction of ``labels`` predicted correctly.
    """
    was_training = model.training
    model.eval()
    try:
        images_t = torch.as_tensor(images)
        labels_t = torch.as_tensor(labels, dtype=torch.long)
        correct = 0
        for start in range(0, len(labels_t), batch_size):
            logits = model(transform(images_t[start:start + batch_size]))
            correct += int((logits.argmax(1) == labels_t[start:start + batch_size]).sum())
        return correct / len(labels_t)
    finally:
        model.train(was_training)

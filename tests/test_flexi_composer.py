"""Mixed-resolution sub-batches through the Composer Trainer with JESTAlgorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback
from composer.models import ComposerModel
from jest_stream.integrations.composer import JESTAlgorithm, jest_first
from streaming import MDSWriter
from torch import nn
from torch.utils.data import DataLoader

from jest_stream import MixedResolution, collate_samples, mixed_resolution_forward

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


class PooledCNN(nn.Module):
    """Takes any image size: convolution, global pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.sizes: list[int] = []

    def forward(self, images):
        self.sizes.append(images.shape[-1])
        return self.head(F.adaptive_avg_pool2d(F.relu(self.conv(images)), 1).flatten(1))


class MixedModel(ComposerModel):
    def __init__(self) -> None:
        super().__init__()
        self.module = PooledCNN()

    def forward(self, batch):
        return mixed_resolution_forward(self.module, batch, key='image')

    def loss(self, outputs, batch, *args, **kwargs):
        return F.cross_entropy(outputs, batch['label'])


class Batches(Callback):
    def __init__(self) -> None:
        self.factors: list[list[float]] = []

    def before_forward(self, state, logger):
        self.factors.append(state.batch['image_factor'].tolist())


def test_mixed_resolution_sub_batches_train_through_the_algorithm(tmp_path, make_streaming):
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(tmp_path / 'images'), columns={'image': 'ndarray:float32:1,8,8',
                                                          'label': 'int'}, size_limit=1 << 12) as w:
        for i in range(120):
            w.write({'image': rng.standard_normal((1, 8, 8)).astype(np.float32),
                     'label': i % 3})
    dataset = make_streaming(tmp_path / 'images', batch_size=20)
    loader = DataLoader(dataset, batch_size=20, collate_fn=collate_samples)
    model = MixedModel()
    batches = Batches()
    algorithm = JESTAlgorithm(filter_ratio=0.8, target_key='label', criterion='hard_learner',
                              forward=lambda m, b: mixed_resolution_forward(m.module, b,
                                                                            key='image'),
                              batch_transform=MixedResolution(key='image', low_fraction=0.5,
                                                              factor=2))
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='4ba',
                      algorithms=[algorithm], algorithm_passes=jest_first, callbacks=[batches],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device='cpu',
                      progress_bar=False, log_to_console=False, seed=1)
    trainer.fit()
    assert len(batches.factors) == 4
    for factors in batches.factors:
        assert sorted(factors) == [1.0, 1.0, 2.0, 2.0]
    # Training forwards ran at both resolutions (8x8 and the downsampled 4x4).
    assert {8, 4} <= set(model.module.sizes)

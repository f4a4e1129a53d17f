"""Entry point of the Composer runs on several ranks that the tests spawn (gloo, CPU)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from helpers.composer import DictClassifier, TrainedBatches
from helpers.data import N_CLASSES, N_FEATURES, features_and_labels
from helpers.distributed import process_group
from helpers.models import tiny_classifier
from jest_stream import ClassificationScorer, ProxyScorer
from jest_stream.integrations.composer import JESTAlgorithm
from jest_stream.integrations.composer.models import call_model

# Per rank: super-batches of 50, sub-batches of 10, 6 steps in the first epoch.
N, B, SUB, STEPS, SAVE_AT = 600, 50, 10, 6, 3


class DictSamples(Dataset):
    """``{'x', 'y', 'sample_id'}`` samples of the toy task."""

    def __init__(self, n: int) -> None:
        x, y = features_and_labels(n)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict:
        return {'x': self.x[index], 'y': self.y[index], 'sample_id': index}


def _proxy_factory(built: list, model) -> ProxyScorer:
    # The proxy's first weights come from torch's global generator, which Composer seeds
    # differently on each rank: the ranks start from different proxies.
    proxy = DictClassifier(torch.nn.Linear(N_FEATURES, N_CLASSES))
    inner = ClassificationScorer(proxy, DictClassifier(tiny_classifier(1)), target_key='y',
                                 forward=call_model)
    built.append(ProxyScorer(inner, optimizer=functools.partial(torch.optim.SGD, lr=0.5)))
    return built[-1]


def _run(out_dir: Path, load_path: str | None) -> dict:
    from composer import Trainer
    from composer.utils import dist as composer_dist

    dataset = DictSamples(N)
    loader = DataLoader(dataset, batch_size=B,
                        sampler=composer_dist.get_sampler(dataset, shuffle=True))
    built: list[ProxyScorer] = []
    trained = TrainedBatches()
    saving = {} if load_path else {'save_folder': str(out_dir / 'ckpt'),
                                    'save_interval': f'{SAVE_AT}ba',
                                    'save_filename': 'ba{batch}-rank{rank}.pt'}
    model = DictClassifier(tiny_classifier(0))
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{STEPS}ba',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      algorithms=[JESTAlgorithm(batch_size=SUB, n_chunks=2,
                                                scorer_factory=functools.partial(
                                                    _proxy_factory, built))],
                      callbacks=[trained], device='cpu', seed=3, progress_bar=False,
                      log_to_console=False, load_path=load_path, **saving)
    trainer.fit()
    trainer.close()
    proxy = built[-1]
    return {'ids': trained.ids, 'updates': proxy.updates,
            'proxy': [p.detach().flatten().tolist() for p in proxy.proxy.parameters()]}


def proxy_worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    """Trains ``STEPS`` batches with a proxy learner, saving Composer's checkpoint after
    ``SAVE_AT``; then resumes a second trainer from it. Writes both runs' trained sample ids
    and final proxy weights to ``rank<r>.json``."""
    with process_group(rank, world, port):
        whole = _run(out_dir, None)
        resumed = _run(out_dir, str(out_dir / 'ckpt' / f'ba{SAVE_AT}-rank0.pt'))
        (out_dir / f'rank{rank}.json').write_text(json.dumps({'whole': whole,
                                                              'resumed': resumed}))

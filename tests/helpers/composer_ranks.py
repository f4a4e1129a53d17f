"""Entry point of the Composer runs on several ranks that the tests spawn (gloo, CPU)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from helpers.composer import DictClassifier, TrainedBatches
from helpers.data import features_and_labels
from helpers.distributed import process_group
from helpers.models import tiny_classifier
from jest_stream import (
    AdaptivePressure,
    ClassificationScorer,
    ProxyScorer,
    SelectionPolicy,
    SelectiveLoader,
)
from jest_stream.integrations.composer.models import call_model
from jest_stream.log import read_log

# Per rank: super-batches of 50, sub-batches of 10, 6 steps in the first epoch.
N, B, SUB, STEPS, SAVE_AT = 600, 50, 10, 6, 3
#: The selection log's columns the tests compare.
LOGGED = ['step', 'sample_id', 'candidate', 'selected', 'score']


class DictSamples(Dataset):
    """``{'x', 'y', 'sample_id'}`` samples of the toy task."""

    def __init__(self, n: int) -> None:
        x, y = features_and_labels(n)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict:
        return {'x': self.x[index], 'y': self.y[index], 'sample_id': index}


#: The proxy's first weights, the same on every rank.
PROXY_SEED = 5


def _proxy(built: list) -> ProxyScorer:
    proxy = DictClassifier(tiny_classifier(PROXY_SEED))
    inner = ClassificationScorer(proxy, DictClassifier(tiny_classifier(1)), target_key='y',
                                 forward=call_model)
    built.append(ProxyScorer(inner, optimizer=functools.partial(torch.optim.SGD, lr=0.5)))
    return built[-1]


def _adaptive() -> SelectionPolicy:
    # Steered by each rank's own learnability: the ranks' policy states differ.
    return SelectionPolicy(adaptive=AdaptivePressure(window=2, min_learnability=0.0))


def _run(out_dir: Path, path: str, load_path: str | None) -> dict:
    """``STEPS`` batches on ``path`` ('algorithm': JESTAlgorithm over a DataLoader of
    super-batches; 'loader': a SelectiveLoader with JESTLoaderCallback), a proxy learner and
    adaptive pressure; a checkpoint after ``SAVE_AT`` unless resuming from ``load_path``."""
    from composer import Trainer
    from composer.utils import dist as composer_dist

    from jest_stream.integrations.composer import JESTAlgorithm, JESTLoaderCallback

    dataset = DictSamples(N)
    built: list[ProxyScorer] = []
    policy = _adaptive()
    log = out_dir / path / 'log'  # each rank writes its own files
    if path == 'algorithm':
        loader = DataLoader(dataset, batch_size=B,
                            sampler=composer_dist.get_sampler(dataset, shuffle=True))
        algorithm = JESTAlgorithm(batch_size=SUB, n_chunks=2, policy=policy,
                                  scorer_factory=lambda model: _proxy(built), selection_log=log)
        recorder = algorithm.selection_log
        extra = {'algorithms': [algorithm]}
    else:
        loader = SelectiveLoader(dataset, batch_size=SUB, super_batch_size=B, n_chunks=2,
                                 scorer=_proxy(built), policy=policy, seed=4,
                                 selection_log=log)
        recorder = loader.selection_log
        extra = {'callbacks': [JESTLoaderCallback()]}
    trained = TrainedBatches()
    saving = {} if load_path else {'save_folder': str(out_dir / path),
                                    'save_interval': f'{SAVE_AT}ba',
                                    'save_filename': 'ba{batch}-rank{rank}.pt'}
    model = DictClassifier(tiny_classifier(0))
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{STEPS}ba',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      callbacks=[trained, *extra.pop('callbacks', [])], device='cpu', seed=3,
                      progress_bar=False, log_to_console=False, load_path=load_path,
                      **extra, **saving)
    trainer.fit()
    trainer.close()
    if isinstance(loader, SelectiveLoader):
        loader.close()  # writes the last rows of its selection log
    proxy = built[-1]
    rows = read_log(log, ranks=[dist.get_rank()], columns=LOGGED).to_pydict()
    return {'ids': trained.ids, 'updates': proxy.updates, 'policy': policy.state_dict(),
            'proxy': [p.detach().flatten().tolist() for p in proxy.proxy.parameters()],
            'log': rows, 'rows_logged': recorder.stats['rows']}


def checkpoint_worker(rank: int, world: int, meeting: str, out_dir: Path) -> None:
    """On each path, trains ``STEPS`` batches, saving Composer's checkpoint after
    ``SAVE_AT``, then resumes a second trainer from it (its selection log cut back to the
    checkpoint and written again). Writes both runs' trained sample ids, final proxy weights,
    policy states and this rank's selection log rows to ``rank<r>.json``."""
    runs: dict[str, dict] = {}
    with process_group(rank, world, meeting):
        for path in ('algorithm', 'loader'):
            runs[path] = {
                'whole': _run(out_dir, path, None),
                'resumed': _run(out_dir, path, str(out_dir / path / f'ba{SAVE_AT}-rank0.pt'))}
        (out_dir / f'rank{rank}.json').write_text(json.dumps(runs))

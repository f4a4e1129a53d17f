"""The annotation job: a frozen reference model's outputs for every sample, into a cache.

:func:`annotate` reads a ``StreamingDataset`` by global sample id through a map-style
view (DataLoader workers decode, the main process runs the model without gradients in
eval mode) and writes a :mod:`jest_stream.cache` store part by part. Each part covers a
contiguous id range and is read in the same batches on every run, so a run that is
interrupted and started again skips the finished parts and writes exactly the bytes an
uninterrupted run would have written. ``jest-stream annotate`` is the command-line face
of the same function.

One run writes a cache folder at a time: a second run into the same folder waits at most
``lock_timeout`` seconds for the first to finish, then raises
:class:`~jest_stream.cache.errors.CacheLocked` naming the folder and the other run. A batch
from the DataLoader workers is awaited at most ``timeout`` seconds: a hung or stopped worker
raises :class:`AnnotationTimeout` instead of blocking the job for ever.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from jest_stream.batch import Batch, batch_length, collate_samples, get_column, move_to_device
from jest_stream.cache.errors import AnnotationTimeout
from jest_stream.cache.format import (
    DEFAULT_PART_SIZE,
    OUTPUT_GROUPS,
    DatasetIndexNotFound,
    Fingerprint,
    dataset_fingerprint,
    model_checksum,
)
from jest_stream.cache.lock import check_timeout
from jest_stream.cache.writer import CacheWriter
from jest_stream.checks import check_int, check_number
from jest_stream.errors import (
    DataError,
    JestStreamError,
    ScoreError,
    SettingError,
    SettingTypeError,
)
from jest_stream.losses import per_example_cross_entropy
from jest_stream.scores import Embeddings
from jest_stream.scoring import scoring_mode
from jest_stream.workers import check_worker_temp_dir

__all__ = ['annotate', 'AnnotationResult', 'AnnotationTimeout', 'ImportPathError', 'load_model',
           'import_object']

logger = logging.getLogger(__name__)


class ImportPathError(JestStreamError, ImportError):
    """An import path (``package.module:name``) names nothing that can be imported."""


@dataclass(frozen=True)
class AnnotationResult:
    """What :func:`annotate` did.

    Attributes:
        path (Path): The cache folder.
        fingerprint (Fingerprint): Dataset, model and transform the outputs belong to; pass
            ``fingerprint.model`` as ``model_checksum`` when opening the cache.
        num_samples (int): Samples in the dataset (all annotated once the run completes).
        parts_total (int): Part files of the cache.
        parts_written (int): Parts this run wrote.
        parts_skipped (int): Parts an earlier run had finished.
        seconds (float): Wall-clock time of this run.
    """

    path: Path
    fingerprint: Fingerprint
    num_samples: int
    parts_total: int
    parts_written: int
    parts_skipped: int
    seconds: float


def import_object(spec: str) -> Any:
    """The object named by ``'package.module:name'`` (``name`` may be dotted).

    Args:
        spec (str): Import path, module and attribute separated by a colon.

    Returns:
        Any: The attribute.
    """
    module_name, sep, attribute = spec.partition(':')
    if not sep or not module_name or not attribute:
        raise SettingError(f'{spec!r} is not an import path; write it as package.module:name')
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportPathError(f'cannot import {module_name!r} (from {spec!r}): {error}. Run from '
                              f'the folder that holds it, or add that folder to PYTHONPATH'
                              ) from error
    value: Any = module
    for part in attribute.split('.'):
        if not hasattr(value, part):
            raise ImportPathError(f'{module_name!r} has no attribute {attribute!r} (from '
                                  f'{spec!r})')
        value = getattr(value, part)
    return value


def load_model(factory: str | Callable[..., nn.Module], *, checkpoint: str | os.PathLike | None
               = None, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a model with ``factory(**kwargs)`` and load a ``state_dict`` checkpoint into it.

    Args:
        factory (str | Callable): A callable returning an ``nn.Module``, or its import path
            ``'package.module:factory'``.
        checkpoint (str | PathLike, optional): File saved with ``torch.save(model.state_dict())``;
            loaded strictly (every key must match).
        kwargs (Mapping, optional): Keyword arguments of the factory.

    Returns:
        nn.Module: The model on the CPU.
    """
    make = import_object(factory) if isinstance(factory, str) else factory
    if not callable(make):
        raise SettingTypeError(f'the model factory {factory!r} is a {type(make).__name__}, not '
                               f'callable')
    model = make(**dict(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise SettingTypeError(f'the model factory {factory!r} returned a '
                               f'{type(model).__name__}, not an nn.Module')
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location='cpu', weights_only=True)
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise SettingError(f'{checkpoint} is not a state_dict; save the reference with '
                               f'torch.save(model.state_dict(), path)')
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise SettingError(f'{checkpoint} does not fit the model built by {factory!r}: '
                               f'{error}') from None
    return model


class _SamplesById(Dataset):
    """A map-style view of a ``StreamingDataset``: item ``i`` is the sample with global id ``i``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return int(self.dataset.num_samples)

    def __getitem__(self, sample_id: int) -> Any:
        return self.dataset.get_item(sample_id)


def _check_finite(values: Tensor, ids: range, what: str) -> None:
    bad = ~torch.isfinite(values.reshape(len(ids), -1)).all(dim=1)
    if bool(bad.any()):
        where = [ids[i] for i in bad.nonzero().flatten().tolist()]
        raise ScoreError(
            f'the reference gave NaN or inf {what} for sample ids {where[:8]}'
            f'{" ..." if len(where) > 8 else ""} ({len(where)} of {len(ids)}); the cache never '
            f'stores such values. Check the model and those samples')


@dataclass
class _Outputs:
    """One batch through the reference: the arrays of the cache and its constants."""

    group: str
    forward: Callable[[nn.Module, Batch], Any] | None
    input_key: str | int | None
    target_key: str | int | None
    image_key: str | int
    text_key: str | int
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    losses: Callable[[nn.Module, Batch, Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.losses is not None:
            if self.group != 'loss':
                raise SettingError('losses=... computes outputs="loss"; embeddings come from '
                                   'forward=... or the model')
            if not callable(self.losses):
                raise SettingTypeError(f'losses={self.losses!r} must be callable: '
                                       f'losses(model, batch, sample_ids) -> Tensor[B]')
            if self.forward is not None or self.input_key is not None \
                    or self.target_key is not None:
                raise SettingError('losses=... computes the losses from the whole batch: drop '
                                   'forward=, input_key= and target_key= (or drop losses=)')
        elif self.group == 'loss':
            if self.target_key is None:
                raise SettingError('outputs="loss" needs target_key (the column of the labels)')
            if self.input_key is None and self.forward is None:
                raise SettingError('outputs="loss" needs input_key (the column of the inputs) '
                                   'or a forward(model, batch) -> logits')

    def __call__(self, model: nn.Module, batch: Batch, ids: range
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if self.losses is not None:
            loss = torch.as_tensor(self.losses(model, batch, torch.arange(ids.start, ids.stop)))
            return self._checked_loss(loss.float(), ids)
        if self.group == 'loss':
            if self.forward is not None:
                logits = self.forward(model, batch)
            else:
                logits = model(get_column(batch, self.input_key, setting='input_key'))
            targets = get_column(batch, self.target_key, setting='target_key')
            return self._checked_loss(self.loss_fn(logits, targets.to(logits.device)).float(),
                                      ids)
        if self.forward is not None:
            out = self.forward(model, batch)
        else:
            out = model(get_column(batch, self.image_key, setting='image_key'),
                        get_column(batch, self.text_key, setting='text_key'))
        emb = out if isinstance(out, Embeddings) else Embeddings(*out)
        for name, tensor in (('image_emb', emb.image), ('text_emb', emb.text)):
            if tensor.dim() != 2 or tensor.shape[0] != len(ids):
                raise ScoreError(f'the reference {name} has shape {tuple(tensor.shape)}; '
                                 f'expected [{len(ids)}, d]')
        # Check after rounding: a value beyond the float16 range would be stored as inf.
        image, text = emb.image.half(), emb.text.half()
        _check_finite(image, ids, 'image embeddings (in float16)')
        _check_finite(text, ids, 'text embeddings (in float16)')
        arrays = {'image_emb': image.cpu().numpy(), 'text_emb': text.cpu().numpy()}
        return arrays, {'temperature': emb.temperature, 'bias': emb.bias}


    def _checked_loss(self, loss: Tensor, ids: range
                      ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if loss.shape != (len(ids),):
            name = 'losses' if self.losses is not None else 'loss_fn'
            raise ScoreError(f'the loss has shape {tuple(loss.shape)} for a batch of '
                             f'{len(ids)}; {name} must return one loss per example')
        _check_finite(loss, ids, 'loss')
        return {'loss': loss.cpu().numpy()}, {}


def _open_dataset(dataset: Any, local: str | os.PathLike | None, remote: str | None,
                  split: str | None, batch_size: int) -> Any:
    if dataset is not None:
        if local is not None or remote is not None:
            raise SettingError('give dataset=... or local=... (and remote=...), not both')
        if not hasattr(dataset, 'get_item') or not hasattr(dataset, 'num_samples'):
            raise SettingTypeError(f'dataset must be a StreamingDataset, got '
                                   f'{type(dataset).__name__}')
        return dataset
    if local is None and remote is None:
        raise SettingError('annotate needs the dataset: dataset=StreamingDataset(...) or '
                           'local=DIR')
    if remote is None:
        index = Path(local) / (split or '') / 'index.json'
        if not index.is_file():
            raise DatasetIndexNotFound(f'{index} does not exist: local= must be the folder of an '
                                       f'MDS dataset (the one holding index.json), or give '
                                       f'remote=')
    from streaming import StreamingDataset  # seconds to import; only the job needs it

    return StreamingDataset(local=None if local is None else str(local), remote=remote,
                            split=split, batch_size=batch_size, shuffle=False)


def _check_settings(outputs: str, transform_id: Any, batch_size: Any, num_workers: Any,
                    lock_timeout: Any, timeout: Any) -> float:
    """Checks the settings; returns ``timeout`` in seconds (0: none)."""
    if outputs not in OUTPUT_GROUPS:
        raise SettingError(f'outputs={outputs!r} is not known; choose one of '
                           f'{sorted(OUTPUT_GROUPS)}')
    if not isinstance(transform_id, str) or not transform_id:
        raise SettingError('transform_id must be a non-empty string naming the input transform')
    check_int(batch_size, 'batch_size', low=1)
    check_worker_temp_dir(check_int(num_workers, 'num_workers', low=0))
    check_timeout(lock_timeout)
    return check_number(timeout, 'timeout', low=0.0, hint='seconds a batch from the DataLoader '
                        'workers may take; 0 means no timeout')


# The start of the message of a DataLoader whose workers missed its timeout.
_WORKER_TIMED_OUT = 'DataLoader timed out'


def _write_pending_within(timeout: float, *args: Any) -> int:
    """:func:`_write_pending`, a batch the workers did not deliver within ``timeout``
    seconds raised as :class:`AnnotationTimeout` (the workers shut down first).

    Raises:
        AnnotationTimeout: The workers missed the timeout.
    """
    try:
        return _write_pending(*args)
    except RuntimeError as error:
        if not str(error).startswith(_WORKER_TIMED_OUT):
            raise
    # Raised here, not in the except block: chained to the DataLoader's error, it would keep
    # its traceback, whose frames hold the DataLoader's iterator and so its workers, alive as
    # long as the caller holds the error. Unchained, the iterator is freed now and shuts its
    # workers down.
    raise AnnotationTimeout(
        f'annotate: the DataLoader workers delivered no batch within timeout={timeout:g} '
        f'seconds: a worker hangs, was stopped (SIGSTOP), or reads that slowly. The finished '
        f'parts are kept: find what blocks the worker (a remote that does not answer, a '
        f'stopped process) and run the same annotation again, or give a larger timeout (0 '
        f'means no timeout)')


def _plan(writer: CacheWriter, pending: list[int], batch_size: int
          ) -> tuple[list[range], list[int]]:
    """The id ranges to read, in batches, and the part each belongs to.

    Each part is read in the same batches on every run, so a resumed run computes exactly
    what an uninterrupted one would have.
    """
    batches: list[range] = []
    owner: list[int] = []
    for part in pending:
        start, stop = writer.part_range(part)
        for first in range(start, stop, batch_size):
            batches.append(range(first, min(first + batch_size, stop)))
            owner.append(part)
    return batches, owner


def _write_pending(writer: CacheWriter, compute: _Outputs, model: nn.Module, loader: DataLoader,
                   batches: list[range], owner: list[int], device: torch.device, bar: tqdm) -> int:
    """Run the model over the planned batches and write each part once it is full."""
    buffers: dict[str, np.ndarray] | None = None
    filled = 0
    written = 0
    with scoring_mode(model):
        for ids, part, batch in zip(batches, owner, loader, strict=True):
            if batch_length(batch) != len(ids):
                raise DataError(f'the dataset returned {batch_length(batch)} samples for the '
                                f'{len(ids)} ids {ids.start}..{ids.stop - 1}')
            arrays, constants = compute(model, move_to_device(batch, device), ids)
            start, stop = writer.part_range(part)
            if buffers is None:
                buffers = {kind: np.empty((stop - start, *a.shape[1:]), dtype=a.dtype)
                           for kind, a in arrays.items()}
            for kind, array in arrays.items():
                buffers[kind][ids[0] - start:ids[-1] + 1 - start] = array
            filled += len(ids)
            bar.update(len(ids))
            if filled == stop - start:
                writer.write_part(part, buffers, constants)
                logger.info('%s: wrote part %d (ids %d..%d)', writer.path, part, start, stop - 1)
                buffers, filled, written = None, 0, written + 1
    return written


def annotate(*, out: str | os.PathLike, model: nn.Module, transform_id: str,
             outputs: str = 'loss', dataset: Any = None, local: str | os.PathLike | None = None,
             remote: str | None = None, split: str | None = None,
             forward: Callable[[nn.Module, Batch], Any] | None = None,
             input_key: str | int | None = None, target_key: str | int | None = None,
             image_key: str | int = 'image', text_key: str | int = 'text',
             loss_fn: Callable[[Tensor, Tensor], Tensor] = per_example_cross_entropy,
             losses: Callable[[nn.Module, Batch, Tensor], Tensor] | None = None,
             batch_size: int = 256, num_workers: int = 2, device: str | torch.device = 'cpu',
             part_size: int = DEFAULT_PART_SIZE, progress: bool = True,
             info: Mapping[str, Any] | None = None, lock_timeout: float = 0.0,
             timeout: float = 300.0) -> AnnotationResult:
    """Compute the reference's outputs for every sample of a dataset and store them.

    Run it again with the same arguments after an interruption: finished parts are kept
    (and checked), the rest are computed. The model is moved to ``device`` and evaluated
    in eval mode without gradients; its training flag is restored afterwards.

    Args:
        out (str | PathLike): The cache folder (new, or one this annotation started).
        model (nn.Module): The frozen reference model, weights loaded.
        transform_id (str): Your name for the input transform the reference sees (the
            dataset class, ``forward``, normalisation...); part of the fingerprint.
        outputs (str): ``loss`` (per-example loss, float32) or ``embeddings`` (image and
            text embeddings in float16, with temperature and bias).
        dataset (StreamingDataset, optional): The dataset, read by global sample id.
        local (str | PathLike, optional): Or its local folder (with ``remote``, ``split``).
        remote (str, optional): Remote location of the shards.
        split (str, optional): Split of the dataset.
        forward (Callable, optional): ``forward(model, batch) -> logits`` (``loss``) or
            ``-> (image_emb, text_emb, temperature, bias)`` (``embeddings``); by default
            ``model(batch[input_key])`` or ``model(batch[image_key], batch[text_key])``.
        input_key (str | int, optional): Column of the inputs (``loss``).
        target_key (str | int, optional): Column of the targets (``loss``).
        image_key (str | int): Column of the images (``embeddings``).
        text_key (str | int): Column of the texts (``embeddings``).
        loss_fn (Callable): ``loss_fn(logits, targets) -> Tensor[B]``; use the scorer's, so
            cached and live losses agree.
        losses (Callable, optional): Instead of ``forward``, the keys and ``loss_fn``:
            ``losses(model, batch, sample_ids) -> Tensor[B]`` from the whole batch. Give the
            scorer's own (``scorer.losses``, e.g. of a
            :class:`~jest_stream.scoring.LanguageModelScorer` with attention masks and
            labels): the cache then stores exactly the losses a live reference gets.
        batch_size (int): Samples per forward pass.
        num_workers (int): DataLoader workers that read and decode samples.
        device (str | torch.device): Where the model runs.
        part_size (int): Samples per part file (the unit of resumption).
        progress (bool): Show a progress bar.
        info (Mapping, optional): Plain JSON values recorded in the manifest for people to read.
        lock_timeout (float): Seconds to wait when another run writes ``out`` (0: refuse at
            once). Finite: every wait is bounded.
        timeout (float): Seconds to wait for each batch from the DataLoader workers (with
            ``num_workers > 0``) before raising :class:`AnnotationTimeout`; 0 means no
            timeout. As the loader's ``timeout``: a finite number >= 0.

    Returns:
        AnnotationResult: The fingerprint and what this run did.

    Raises:
        SettingError: A setting is not valid (named in the message), or ``num_workers > 0``
            with a temp dir too long for the workers' sockets
            (:func:`~jest_stream.workers.check_worker_temp_dir`).
        SettingTypeError: ``timeout``, ``batch_size`` or ``num_workers`` is not a number
            (bools are not numbers).
        AnnotationTimeout: The DataLoader workers delivered no batch within ``timeout``.
        CacheLocked: Another run writes ``out`` (and did not finish within ``lock_timeout``).
        FingerprintMismatch: ``out`` holds a cache of another dataset, model, transform or size.
        CacheFolderNotEmpty: ``out`` holds other files.
        ScoreError: The reference returned NaN, inf or outputs of the wrong shape.
    """
    timeout = _check_settings(outputs, transform_id, batch_size, num_workers, lock_timeout,
                              timeout)
    compute = _Outputs(outputs, forward=forward, input_key=input_key, target_key=target_key,
                       image_key=image_key, text_key=text_key, loss_fn=loss_fn, losses=losses)
    started = time.perf_counter()
    device = torch.device(device)
    data = _open_dataset(dataset, local, remote, split, batch_size)
    fingerprint = Fingerprint(dataset=dataset_fingerprint(data), model=model_checksum(model),
                              transform=transform_id)
    notes = {'dataset': [str(stream.local) for stream in data.streams],
             'dataset_class': type(data).__name__, 'model_class': type(model).__name__,
             **dict(info or {})}
    with CacheWriter(out, fingerprint=fingerprint, num_samples=int(data.num_samples),
                     group=outputs, part_size=part_size, info=notes,
                     lock_timeout=lock_timeout) as writer:
        pending = writer.pending_parts()
        skipped = writer.num_parts - len(pending)
        if skipped:
            logger.info('%s: %d of %d parts already annotated; continuing', out, skipped,
                        writer.num_parts)
        batches, owner = _plan(writer, pending, batch_size)
        workers = num_workers if batches else 0
        loader = DataLoader(_SamplesById(data), batch_sampler=batches, num_workers=workers,
                            collate_fn=collate_samples, pin_memory=device.type == 'cuda',
                            timeout=timeout if workers else 0)
        done = writer.layout.num_samples - sum(len(ids) for ids in batches)
        model.to(device)
        with tqdm(total=writer.layout.num_samples, initial=done, unit='sample',
                  desc='annotate', disable=not progress, dynamic_ncols=True) as bar:
            written = _write_pending_within(timeout, writer, compute, model, loader, batches,
                                            owner, device, bar)
        writer.finish()
    return AnnotationResult(path=Path(out), fingerprint=fingerprint,
                            num_samples=writer.layout.num_samples, parts_total=writer.num_parts,
                            parts_written=written, parts_skipped=skipped,
                            seconds=time.perf_counter() - started)

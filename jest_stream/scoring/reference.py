"""Reference outputs: a live frozen model, or values stored with the data.

A reference is either an ``nn.Module`` (evaluated on each super-batch by the
scorer, frozen here so it can never train by accident) or a *table*: an object
whose ``outputs(batch, sample_ids)`` returns the stored outputs for the batch,
as columns of the batch itself (:class:`ColumnReference`) or read from an offline
cache keyed by sample id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from jest_stream.batch import Batch, get_column
from jest_stream.errors import MissingColumnError, SettingError, SettingTypeError

__all__ = ['ReferenceTable', 'ColumnReference', 'freeze', 'resolve_reference', 'require_output']


@runtime_checkable
class ReferenceTable(Protocol):
    """Stored reference outputs.

    ``outputs`` returns a mapping with the keys the scorer needs: ``loss``
    (``Tensor[B]``) for per-example scorers; ``image_emb``, ``text_emb``
    (``Tensor[B, d]``), ``temperature`` and ``bias`` (floats) for contrastive ones.
    """

    def outputs(self, batch: Batch, sample_ids: Tensor) -> Mapping[str, Any]:
        ...


class ColumnReference:
    """Reference outputs stored as columns of the dataset.

    Args:
        loss (str | int, optional): Column with the reference's per-example loss.
        image_emb (str | int, optional): Column with the reference's image embedding.
        text_emb (str | int, optional): Column with the reference's text embedding.
        temperature (float, optional): The reference's temperature (contrastive only).
        bias (float, optional): The reference's bias (contrastive only).
    """

    def __init__(self, *, loss: str | int | None = None, image_emb: str | int | None = None,
                 text_emb: str | int | None = None, temperature: float | None = None,
                 bias: float | None = None) -> None:
        self.columns = {k: v for k, v in
                        {'loss': loss, 'image_emb': image_emb, 'text_emb': text_emb}.items()
                        if v is not None}
        if not self.columns:
            raise SettingError('ColumnReference needs loss=... or image_emb=... and text_emb=...')
        self.constants = {k: v for k, v in {'temperature': temperature, 'bias': bias}.items()
                          if v is not None}

    def outputs(self, batch: Batch, sample_ids: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.constants)
        for name, column in self.columns.items():
            value = get_column(batch, column, setting=f'ColumnReference({name}=...)')
            out[name] = torch.as_tensor(value)
        return out


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with gradients off, in place; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def resolve_reference(reference: Any, *, needed: bool, setting: str = 'reference') -> Any:
    """Check and prepare a reference: a frozen ``nn.Module``, a table, or None when unneeded."""
    if reference is None:
        if needed:
            raise SettingError(
                f'{setting} is None but the criterion needs reference outputs; pass a frozen '
                f'model, a ColumnReference, or a reference cache (or use criterion="hard_learner")')
        return None
    if isinstance(reference, nn.Module):
        return freeze(reference)
    if isinstance(reference, ReferenceTable):
        return reference
    raise SettingTypeError(
        f'{setting} must be an nn.Module, a ColumnReference or an object with '
        f'outputs(batch, sample_ids); got {type(reference).__name__}')


def require_output(outputs: Mapping[str, Any], key: str, *, source: Any) -> Any:
    """``outputs[key]``, or an error saying which reference lacks it."""
    if key not in outputs:
        raise MissingColumnError(
            f'the reference {type(source).__name__} gave no {key!r} (it gave {sorted(outputs)}); '
            f'this scorer needs {key!r} from its reference')
    return outputs[key]

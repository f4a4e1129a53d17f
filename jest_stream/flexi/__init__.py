"""Flexi-JEST: score at low resolution, train at mixed resolution.

Three pieces, each usable on its own, one module each:

- :mod:`jest_stream.flexi.low_resolution`: **cheaper inputs.** :func:`downsample` and
  :class:`LowResolution` (a scorer's ``input_transform``) shrink images by a factor; a
  factor of 2 cuts the FLOPs of a convolutional network about 4x. :class:`FlexiForward` is a
  scorer ``forward`` that runs the learner at a cheaper setting (downsampled inputs, or a
  larger patch size).
- :mod:`jest_stream.flexi.patch_resize`: **patch sizes that change at run time, for ViTs
  (FlexiViT).** :class:`FlexiPatchEmbed` stores its weights at one base patch size and
  resizes them on the fly with the pseudo-inverse resize (:func:`pi_resize`);
  :func:`resize_position_embeddings` resizes the position embeddings to the new grid.
- :mod:`jest_stream.flexi.mixed_resolution`: **mixed-resolution training.**
  :class:`MixedResolution` (the loader's ``batch_transform``) marks a fraction of each
  selected sub-batch for low resolution with one extra per-row column;
  :func:`mixed_resolution_forward` runs each group at its resolution and returns the
  outputs in row order, so targets, losses and metrics need no change.
"""

from jest_stream.flexi.low_resolution import (
    DOWNSAMPLE_MODES,
    FlexiForward,
    LowResolution,
    downsample,
)
from jest_stream.flexi.mixed_resolution import (
    MixedResolution,
    ResolutionGroup,
    factor_column,
    low_resolution_rows,
    mixed_resolution_forward,
    mixed_resolution_loss,
    patch_size_column,
    resolution_groups,
    split_mixed_resolution,
)
from jest_stream.flexi.patch_resize import (
    FlexiPatchEmbed,
    pi_resize,
    pi_resize_matrix,
    resize_matrix,
    resize_position_embeddings,
)

__all__ = [
    'DOWNSAMPLE_MODES',
    'FlexiForward',
    'FlexiPatchEmbed',
    'LowResolution',
    'MixedResolution',
    'ResolutionGroup',
    'downsample',
    'factor_column',
    'low_resolution_rows',
    'mixed_resolution_forward',
    'mixed_resolution_loss',
    'patch_size_column',
    'pi_resize',
    'pi_resize_matrix',
    'resize_matrix',
    'resize_position_embeddings',
    'resolution_groups',
    'split_mixed_resolution',
]

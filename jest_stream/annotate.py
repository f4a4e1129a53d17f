"""The annotation job, kept at its first import path: it lives in :mod:`jest_stream.cache.annotate`.

``from jest_stream.annotate import annotate`` keeps working; ``jest_stream.annotate`` at the
package top level is the function itself.
"""

from jest_stream.cache.annotate import AnnotationResult, annotate, import_object, load_model

__all__ = ['annotate', 'AnnotationResult', 'load_model', 'import_object']

"""Built-in data components: ``files_source`` (documents from files), ``filter`` with the
``length`` and ``code_quality`` document filters, and ``exact_dedup``.

These modules import only the standard library and the core (zstandard); the stages do
their work per part through the stage's executor, and resume per part after a crash.
"""
from recipe_engine import hookimpl

from . import (decontaminate, extract, instructions, langid, near_dedup, package_docs, pii, quality,
               sources, split)
from .dedup import ExactDedup
from .filters import CodeQualityFilter, DocumentFilter, FilterStage, LengthFilter
from .source import FilesSource

__all__ = ["CodeQualityFilter", "DocumentFilter", "ExactDedup", "FilesSource", "FilterStage",
           "LengthFilter"]


@hookimpl
def recipe_components():
    return [FilesSource, FilterStage, LengthFilter, CodeQualityFilter, ExactDedup,
            *quality.COMPONENTS, *near_dedup.COMPONENTS, *pii.COMPONENTS,
            *decontaminate.COMPONENTS, *langid.COMPONENTS,
            *sources.COMPONENTS, *extract.COMPONENTS,
            *package_docs.COMPONENTS, *split.COMPONENTS, *instructions.COMPONENTS]

"""The labeling service's use cases, over the store ports (``domain.ports``) and an ``ObjectStore``.

Transport-free: the gRPC servicer converts requests into these calls and the results back, and the
event handlers call them too. Every method validates its input first, so bad input is refused with an
``InvalidArgumentError`` (or ``NotFoundError`` / ``FailedPreconditionError``) before anything is written.
The use cases live with their aggregate: ``projects``, ``imports``, ``annotations``, ``datasets``, and
``feedback`` (serving's feedback into items).
"""

from __future__ import annotations

import threading

from gristmill.core.storage import ObjectStore
from gristmill.core.values import utc_now
from gristmill.labeling.domain.annotations import AnnotationUseCases, validate_prediction
from gristmill.labeling.domain.common import Clock, organization
from gristmill.labeling.domain.datasets import DatasetUseCases, ExportChunk
from gristmill.labeling.domain.feedback import FeedbackUseCases
from gristmill.labeling.domain.importer import IndexCache
from gristmill.labeling.domain.imports import ImportUseCases
from gristmill.labeling.domain.ports import LabelingStore
from gristmill.labeling.domain.projects import ProjectUseCases
from gristmill.labeling.domain.tokens import TokenizerSource

__all__ = ["Clock", "ExportChunk", "LabelingService", "organization", "utc_now", "validate_prediction"]


class LabelingService(ProjectUseCases, FeedbackUseCases, ImportUseCases, AnnotationUseCases, DatasetUseCases):
    def __init__(
        self,
        store: LabelingStore,
        objects: ObjectStore,
        *,
        clock: Clock = utc_now,
        index_cache: IndexCache | None = None,
        tokenizers: TokenizerSource | None = None,
    ) -> None:
        """``tokenizers``: base models' tokenizers for projects with a token limit (the registry's, in a service;
        None refuses such projects with FAILED_PRECONDITION)."""
        self.store = store
        self.objects = objects
        self.clock = clock
        self.indexes = index_cache or IndexCache()
        self.tokenizers = tokenizers
        self._publish_locks = {}
        self._publish_guard = threading.Lock()

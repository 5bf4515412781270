"""Seconds per stage of the tiled-inference pipeline, summed over threads: the one clock the
:class:`~fcn_deploy.infer.segmenter.Segmenter`, its assembler and the ``infer`` pipeline share."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class StageClock:
    """Seconds per pipeline stage, summed over calls and threads (``time.perf_counter``).

    Stages: ``read`` (``--decode gpu``: files read and checked), ``decode``, ``tiles`` (cut and
    normalise, upload included), ``upload``, ``engine``, ``stitch`` (accumulate and argmax,
    download included), ``download``, ``encode``. Summed
    over threads, so stages that overlap can add up to more than the wall time. On CUDA the
    host only enqueues work: ``upload`` is the pinned staging copy plus the enqueue of the
    device copy, ``engine`` what the runner's ``infer`` blocks for, and ``download`` the
    device-to-host copies of labels and logits, which wait for every kernel queued before them
    (so device time of the stitching kernels lands in ``download``).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

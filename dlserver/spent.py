"""Where a backend's frames spend their time (worker processes, Ray): per-stage sums
logged every so many frames."""

from __future__ import annotations

import logging
import threading
from typing import Dict

log = logging.getLogger("dlserver")


class Spent:
    """Where a backend's frames spend their time, summed per stage and logged (INFO)
    every `EVERY` frames as ms per frame. What a slow path is measured with
    (docs/performance.md): the worker processes' stages (waiting for a free input block,
    copying inputs in, waiting for the pipe, the worker's answer, of which running the
    model and writing outputs, copying outputs out) and the Ray front end's (the frames'
    `ray.put`, sending, waiting for the answers, the replica's model time)."""

    EVERY = 50  # a server's first 50 include the warm-up; the next are steady

    def __init__(self, name: str) -> None:
        self.name = name
        self.sums: Dict[str, float] = {}
        self.frames = self.batches = 0
        self.lock = threading.Lock()  # batches end on several threads at once

    def add(self, frames: int, seconds: Dict[str, float]) -> None:
        """A batch of `frames` frames spent `seconds` (stage -> seconds, all frames')."""
        with self.lock:
            self._add(frames, seconds)

    def _add(self, frames: int, seconds: Dict[str, float]) -> None:
        for key, value in seconds.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.frames += frames
        self.batches += 1
        if self.frames >= self.EVERY:
            log.info("%s: %d frames in %d batches, ms per frame: %s", self.name, self.frames,
                     self.batches, ", ".join(f"{k} {1e3 * v / self.frames:.2f}"
                                              for k, v in self.sums.items()))
            self.sums, self.frames, self.batches = {}, 0, 0


__all__ = ["Spent"]

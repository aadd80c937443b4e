"""Throughput / latency measurement of SUREID models (and the dense models they come from).

Timings are wall-clock medians over repeats after warm-up, under ``torch.inference_mode``; ratios
are only meaningful between rows measured in the same run on the same machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Timing:
    """Milliseconds per batch over ``repeats`` runs, and the batch size they were measured at."""

    batch_size: int
    median_ms: float
    min_ms: float
    max_ms: float

    @property
    def images_per_second(self) -> float:
        return self.batch_size / (self.median_ms / 1000.0)


def time_forward(
    model: nn.Module, pixel_values: torch.Tensor, repeats: int = 5, warmup: int = 2
) -> Timing:
    """Time ``model(pixel_values)`` in eval mode; synchronises CUDA around each run."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model.eval()
    sync = torch.cuda.synchronize if pixel_values.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(pixel_values)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return Timing(pixel_values.shape[0], statistics.median(times), min(times), max(times))

"""The pipeline's own config sections: how profile measures, and the budgets the gates hold
each model to (the stages' sections are their own packages' configs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepipe.errors import ConfigError


@dataclass
class ProfileConfig:
    batch_sizes: tuple[int, ...] = (1, 32)
    providers: str = "auto"
    threads: int | None = None
    rounds: int = 20  # interleaved rounds (x 10 calls) per batch size
    dims: dict[str, int] = field(default_factory=dict)  # sizes of named dynamic dims, e.g. {seq = 128}

    def __post_init__(self):
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("profile batch_sizes must be positive integers")


@dataclass
class Budgets:
    """Gate thresholds. None disables a gate. Parity tolerances live in [export]."""

    max_accuracy_drop: float | None = 0.01  # INT8 vs FP32, absolute (0.01 = 1 point)
    min_accuracy: float | None = None  # FP32 held-out accuracy after training
    min_int8_speedup: float | None = 1.0  # INT8 vs FP32 p50, at each [quantize] batch size
    max_model_size_mb: float | None = None  # of the final (deployed) model
    require_int8: bool = True  # False: if quantize refuses (no faster, accurate INT8), deploy FP32
    max_total_accuracy_drop: float | None = None  # deployed model vs the trained FP32 model
    max_prune_accuracy_drop: float | None = 0.015  # pruned+fine-tuned vs unpruned, absolute
    min_prune_speedup: float | None = None  # ORT p50, pruned vs unpruned, at [prune] batch_sizes

"""Learning-rate schedules: warm-up, then inverse square root, or cosine / linear decay over the budget."""
from __future__ import annotations

import math


def lr_at(step: int, cfg, done: float = 0.0) -> float:
    """Learning rate of update `step` (counted from 1): linear warm-up to cfg.lr, then inverse square
    root decay, or cosine / linear decay to cfg.lr_end by the end of the budget (`done`: the share of
    the budget used, 0 to 1)."""
    step = max(step, 1)
    warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * min(warm, math.sqrt(cfg.warmup_steps / step) if cfg.warmup_steps else 1 / math.sqrt(step))
    done = min(max(done, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * done)) if cfg.schedule == "cosine" else 1 - done
    return warm * (cfg.lr_end + (cfg.lr - cfg.lr_end) * shape)


def budget_used(cfg, step: int, epoch: float, elapsed_s: float, tokens: int = 0) -> float:
    """Share of the training budget used: the largest of steps, epochs, tokens and minutes (whichever
    ends first)."""
    shares = [step / cfg.max_steps if cfg.max_steps else 0.0,
              tokens / cfg.max_tokens if cfg.max_tokens else 0.0,
              epoch / cfg.max_epochs if cfg.max_epochs else 0.0,
              elapsed_s / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0]
    return max(shares)

"""Learning-rate and EMA-momentum schedules, as scenic's ``lr_schedules`` compute them for the official config.

Step t counts optimizer updates from 0: update t uses lr(t) (so the first update has lr(0) = 0, as optax's
``inject_hyperparams``) and, after it, the EMA uses momentum(t).
"""
from __future__ import annotations

import math


def learning_rate(step: int, peak: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine to ``min_ratio * peak`` at
    ``total_steps``."""
    warm = 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    progress = max(0, step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * warm * cosine


def ema_momentum(step: int, total_steps: int, start: float = 0.996) -> float:
    """Cosine from ``start`` at step 0 to 1 at ``total_steps``."""
    return 1.0 - (1.0 - start) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))

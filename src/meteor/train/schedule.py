"""The learning-rate schedule: linear warm-up, then cosine decay to zero.

One function for every training loop of the package: both training stages (``meteor.train``), and
the demo's tiny CLIP and LLaMA pre-training.
"""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(total_steps: int, warmup_steps: int, decay_during_warmup: bool = False
                  ) -> Callable[[int], float]:
    """The factor of the peak learning rate at each optimizer step (for ``LambdaLR``).

    The factor rises linearly over the first ``warmup_steps`` steps (none when 0), reaching 1 at
    the last of them, and follows a half cosine from 1 to 0 by ``total_steps``. By default the cosine starts
    after the warm-up (LLaVA's and Hugging Face's ``cosine`` schedule); with
    ``decay_during_warmup`` it runs over all the steps and the warm-up multiplies its start.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"warmup_cosine needs total_steps ≥ 1 and warmup_steps ≥ 0, got "
                         f"{total_steps} and {warmup_steps}")

    def factor(step: int) -> float:
        if decay_during_warmup:
            progress = step / total_steps
        else:
            progress = max(0, step - warmup_steps) / max(1, total_steps - warmup_steps)
        ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return ramp * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor



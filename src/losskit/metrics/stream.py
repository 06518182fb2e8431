"""Online continual-learning accuracy: A_auc and A_last (Koh et al., "Online
Continual Learning on Class Incremental Blurry Task Configuration with Anytime
Inference", ICLR 2022; used by MVP / Si-Blurry).

* ``A_auc``: the mean of the accuracies measured every ``eval_period`` stream
  samples, each on the test samples of the classes seen so far (the area under
  the anytime-accuracy curve with a constant step, as the Si-Blurry trainer);
* ``A_last``: the accuracy on the test samples of every seen class after the
  last task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["AnytimeAccuracy", "a_auc"]


def a_auc(accuracies) -> float:
    """Mean of the anytime accuracies (``ValueError`` when there is none)."""
    accs = [float(a) for a in accuracies]
    if not accs:
        raise ValueError("accuracies: expected at least one anytime evaluation, got none (eval_period larger "
                         "than the stream?)")
    if any(not (0.0 <= a <= 1.0) or math.isnan(a) for a in accs):
        raise ValueError(f"accuracies: expected values in [0, 1], got {accs}")
    return sum(accs) / len(accs)


@dataclass
class AnytimeAccuracy:
    """Records ``(samples_seen, accuracy)`` during the stream and the accuracy at each task end."""

    samples: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    task_end: list[float] = field(default_factory=list)

    def record(self, samples_seen: int, accuracy: float) -> None:
        self.samples.append(int(samples_seen))
        self.accuracies.append(float(accuracy))

    def end_task(self, accuracy: float) -> None:
        self.task_end.append(float(accuracy))

    @property
    def a_auc(self) -> float:
        return a_auc(self.accuracies)

    @property
    def a_last(self) -> float:
        if not self.task_end:
            raise ValueError("A_last: no task has ended yet")
        return self.task_end[-1]

"""What the worker does about drift: ``alert``, ``reset``, ``challenger`` and ``freeze``.

- ``alert``: events and metrics only.
- ``reset``: a concept-drift alarm replaces the model by a fresh one built from the spec
  (metrics continue; ``model_version`` goes up).
- ``challenger``: a concept-drift alarm starts a fresh candidate that learns in *shadow* from
  the drift point on the same labelled records (its predictions are not published). Once it
  has seen ``min_records`` labelled records and beats the champion on the last ``window``
  of them by ``margin`` (accuracy points for classifiers; a relative MAE reduction for
  regressors), it is promoted: it becomes the model, ``model_version`` goes up, and a
  ``promotion`` event is published. A challenger that has not won after ``max_records`` is
  discarded (``challenger_discarded``).
- ``freeze`` (data drift): while any input feature is in alarm, records are predicted but not
  learned.

Every decision is taken at a record, inside the learning loop, so replays reproduce it.

>>> from river import linear_model
>>> from worker.config import ChallengerSettings
>>> c = Challenger(linear_model.LogisticRegression(), "classification", 0, ChallengerSettings(window=10, min_records=10, margin=0.1))
>>> for i in range(20):
...     c.observe({"a": 1.0}, True, champion_prediction=False)
>>> c.verdict()
'promote'
"""

from __future__ import annotations

from collections import deque
from typing import Any

from worker.config import ChallengerSettings


class Challenger:
    """A candidate model trained in shadow beside the champion, with both scored on the same records."""

    def __init__(self, model: Any, task: str, started_at: int, settings: ChallengerSettings):
        from worker.learner import make_step

        self.model = model
        self.task = task
        self.started_at = started_at
        self.settings = settings
        self.seen = 0
        # per-record score: 1/0 correct (classification) or absolute error (regression)
        self.champion: deque[float] = deque(maxlen=settings.window)
        self.candidate: deque[float] = deque(maxlen=settings.window)
        self.sums = [0.0, 0.0]  # running sums of the two windows
        self._step = make_step(model, task, with_proba=False)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_step"]  # a closure: rebuilt on load
        return state

    def __setstate__(self, state: dict) -> None:
        from worker.learner import make_step

        self.__dict__.update(state)
        self._step = make_step(self.model, self.task, with_proba=False)

    def observe(self, x: dict, y: Any, champion_prediction: Any) -> None:
        """Test-then-train the candidate on a labelled record and score both models on it."""
        pred, _ = self._step(x, y)
        self.seen += 1
        if self.task == "classification":
            a, b = (1.0 if champion_prediction == y else 0.0), (1.0 if pred == y else 0.0)
        else:
            a, b = abs(y - (champion_prediction or 0.0)), abs(y - (pred or 0.0))
        if len(self.champion) == self.champion.maxlen:
            self.sums[0] -= self.champion[0]
            self.sums[1] -= self.candidate[0]
        self.champion.append(a)
        self.candidate.append(b)
        self.sums[0] += a
        self.sums[1] += b

    def summary(self) -> dict:
        """What a metrics report says of the challenger."""
        return {"started_at": self.started_at, "records": self.seen,
                "scores": dict(zip(("champion", "challenger"), self.scores()))}

    def scores(self) -> tuple[float, float]:
        """Rolling (champion, candidate) accuracy, or MAE for regressors."""
        n = len(self.champion) or 1
        return self.sums[0] / n, self.sums[1] / n

    def verdict(self) -> str | None:
        """``"promote"``, ``"discard"`` or None (keep going)."""
        s = self.settings
        if self.seen >= s.min_records and len(self.champion) == self.champion.maxlen:
            champ, cand = self.scores()
            if self.task == "classification":
                if cand - champ > s.margin:
                    return "promote"
            elif champ > 0 and (champ - cand) / champ > s.margin:
                return "promote"
        if self.seen >= s.max_records:
            return "discard"
        return None

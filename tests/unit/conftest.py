"""Helpers shared by the unit tests."""

from __future__ import annotations

import pytest

from worker.learner import InlineLearners


class LateLearners(InlineLearners):
    """Inline learners whose results are never back early: the runtime publishes a poll only
    when ``limits.polls_in_flight`` forces it (or a drain or an empty poll does), so polls
    stay in flight and snapshots begin polls after they were asked for."""

    def has_result(self) -> bool:
        return False


@pytest.fixture
def late_learners() -> type[LateLearners]:
    """:class:`LateLearners`, to build with a :class:`~worker.learner.LearnerConfig`."""
    return LateLearners

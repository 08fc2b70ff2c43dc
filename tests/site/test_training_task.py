"""The site's declared aggregation weight."""

import pytest

from app_site.training_task import aggregation_weight


def test_steps_weigh_every_full_round_alike_and_cases_follow_the_training_split():
    assert aggregation_weight("steps", 20, 22, 20) == aggregation_weight("steps", 20, 14, 20) == 20
    assert aggregation_weight("cases", 20, 22, 20) == 22
    assert aggregation_weight("cases", 10, 22, 20) == 11  # half a round counts half
    with pytest.raises(ValueError, match="steps or cases, got 'samples'"):
        aggregation_weight("samples", 20, 22, 20)

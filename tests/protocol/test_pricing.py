import pytest

from loomnet.protocol import cost_of, credits_to_micro


def test_cost_rounds_up_to_the_micro_credit():
    assert cost_of(0, 0, 10**6, 10**6) == 0
    assert cost_of(1_000_000, 0, 150_000, 0) == 150_000
    assert cost_of(58, 42, 100_000, 200_000) == 15  # 5.8 + 8.4 = 14.2, rounded up once
    assert cost_of(1, 0, 1, 0) == 1


def test_credits_to_micro():
    assert credits_to_micro(0.15) == 150_000
    with pytest.raises(ValueError):
        credits_to_micro(-1)

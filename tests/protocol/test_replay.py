import pytest

from loomnet.protocol import ErrorCode, ReplayGuard, RequestRejected


def codes(guard, request, now):
    try:
        guard.check(request, now=now)
    except RequestRejected as exc:
        return exc.code
    return None


def test_accepts_once_then_refuses_replay(executor_key, make_request):
    guard = ReplayGuard(executor_key.peer_id)
    request = make_request()
    assert codes(guard, request, 1000.0) is None
    assert codes(guard, request, 1001.0) == ErrorCode.REPLAYED_NONCE


def test_audience_and_freshness(executor_key, client_key, make_request):
    guard = ReplayGuard(executor_key.peer_id, max_age=60, max_skew=5)
    assert codes(guard, make_request(audience=client_key.peer_id), 1000.0) == ErrorCode.WRONG_AUDIENCE
    assert codes(guard, make_request(created_at=1000.0), 1060.5) == ErrorCode.REQUEST_EXPIRED
    assert codes(guard, make_request(created_at=1006.0), 1000.0) == ErrorCode.REQUEST_FROM_FUTURE
    assert codes(guard, make_request(created_at=1004.0), 1000.0) is None
    assert codes(guard, make_request(created_at=940.0), 1000.0) is None


def test_memory_is_bounded_and_expires(executor_key, make_request):
    guard = ReplayGuard(executor_key.peer_id, max_age=10, capacity=3)
    for i in range(3):
        assert codes(guard, make_request(created_at=100.0 + i), 100.0 + i) is None
    refused = make_request(created_at=103.0)
    with pytest.raises(RequestRejected) as info:
        guard.check(refused, now=103.0)
    assert info.value.code == ErrorCode.OVER_CAPACITY and info.value.retryable
    # once the old requests could no longer be replayed anyway, their nonces go
    assert codes(guard, make_request(created_at=111.5), 111.5) is None
    assert len(guard) <= 3


def test_a_replay_of_an_expired_request_is_still_refused(executor_key, make_request):
    guard = ReplayGuard(executor_key.peer_id, max_age=10)
    request = make_request(created_at=100.0)
    guard.check(request, now=100.0)
    assert codes(guard, request, 200.0) == ErrorCode.REQUEST_EXPIRED

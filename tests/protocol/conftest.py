import os

import pytest

from loomnet.protocol import ChatMessage, InferenceRequest, SigningKey


@pytest.fixture
def executor_key() -> SigningKey:
    return SigningKey(bytes(range(32)))


@pytest.fixture
def client_key() -> SigningKey:
    return SigningKey(bytes(range(1, 33)))


@pytest.fixture
def make_request(executor_key):
    def make(**overrides) -> InferenceRequest:
        fields = dict(
            audience=executor_key.peer_id,
            nonce=os.urandom(16),
            created_at=1000.0,
            model="smollm2-135m",
            messages=[ChatMessage("user", "hello")],
            max_tokens=16,
        )
        fields.update(overrides)
        return InferenceRequest(**fields)

    return make

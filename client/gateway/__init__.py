"""loomnet.client.gateway — an OpenAI- and Anthropic-compatible HTTP gateway on the client
library (``loomnet gateway``; ``docs/gateway.md``).

Any OpenAI or Anthropic SDK uses the network by pointing its base URL here:
``POST /v1/chat/completions``, ``POST /v1/messages``, ``GET /v1/models``. One running
:class:`~loomnet.client.LoomClient` (one libp2p host) serves every request; receipts are
verified and booked underneath as for any client.
"""

from ._app import gateway_app as gateway_app
from ._call import ChatCall as ChatCall, Steering as Steering
from ._config import DEFAULT_PORT as DEFAULT_PORT, GatewayConfig as GatewayConfig, GatewayKey as GatewayKey
from ._errors import GatewayError as GatewayError
from ._gateway import Gateway as Gateway, GatewayStatistics as GatewayStatistics
from ._serve import GatewayServer as GatewayServer, open_gateway as open_gateway, serve_gateway as serve_gateway

__all__ = [
    "DEFAULT_PORT",
    "ChatCall",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewayKey",
    "GatewayServer",
    "GatewayStatistics",
    "Steering",
    "gateway_app",
    "open_gateway",
    "serve_gateway",
]

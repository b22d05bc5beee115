"""loomnet.client.gateway — an OpenAI- and Anthropic-compatible HTTP gateway on the client
library (``loomnet gateway``; ``docs/gateway.md``)."""

"""loomnet.client — network layer, offer table, routing and the client library."""

"""loomnet.node — the executor daemon, its backends and the ``loomnet`` CLI."""

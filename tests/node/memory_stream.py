"""Re-export: the in-memory stream pair lives in the library now (``client/_memory_stream``)."""

from loomnet.client._memory_stream import MemoryP2PStream, MemoryStreamOpener, stream_pair

__all__ = ["MemoryP2PStream", "MemoryStreamOpener", "stream_pair"]

"""LLM runtime adapters behind one small interface."""

"""Source memories: extraction to HDF5, loading and validation, per-class retrieval, inspection."""

from vspa.memory.retrieval import Retriever
from vspa.memory.store import FORMAT_VERSION, MemoryBank, memory_writer, open_memory, write_memory

__all__ = ["FORMAT_VERSION", "MemoryBank", "Retriever", "memory_writer", "open_memory", "write_memory"]

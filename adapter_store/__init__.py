"""Adapters: names, versions, files. Never imports vLLM or FastAPI."""

from adapter_store.catalog import AdapterCatalog, ServedAdapter, content_digest

__all__ = ["AdapterCatalog", "ServedAdapter", "content_digest"]

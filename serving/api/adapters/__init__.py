"""/v1/adapters: the adapter store's admin API (register, upload, aliases, pins, unload, delete, health)."""

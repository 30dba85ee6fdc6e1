"""OpenAI-compatible HTTP API: one package per area, wired by :func:`build_app`."""

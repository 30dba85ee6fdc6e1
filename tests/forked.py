"""Processes forked from an interpreter that has already imported what they need.

``in_fork``: vLLM loads its plugins once per process, so each plugin set under
test needs a process of its own; an interpreter importing vLLM costs about 12 s,
an engine start less. So the scripts that compare plugin sets import vLLM once,
with no plugin loaded, and fork a process per set, which sets ``VLLM_PLUGINS``
and loads the plugins itself, as a fresh process would.

``forkserver``: the registry's multi-process tests (writers racing on one
database) ran each writer in a spawned interpreter, which imported pytest, the
store, SQLAlchemy, psycopg and Alembic again: ~1.5 s of CPU per process, 24 of
them, a third of the store tests' CPU. Forked from multiprocessing's fork
server instead, which imported those modules once, a writer starts in
milliseconds; it is still a process of its own, with its own connections,
forked from a server that never opened one (nothing of the test's process is
shared: the test process is not the parent, as it would be with a plain fork).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.context import ForkServerContext
from typing import Any

FORKSERVER_PRELOAD = ("tests.adapter_store.test_registry", "tests.adapter_store.test_registry_fleet")
"""The modules whose functions the fork server's processes run: imported once, by the server (what they import
with them). One list for the process: multiprocessing has one fork server per process, started by its first use."""


def forkserver() -> ForkServerContext:
    """multiprocessing's ``forkserver`` context, its server preloading ``FORKSERVER_PRELOAD``."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return context


def no_plugin_loaded() -> None:
    """Fail unless this process has loaded no vLLM plugin yet (a fork would share what it loaded)."""
    import vllm.plugins

    assert not vllm.plugins.plugins_loaded, "a vLLM plugin loaded before the fork"


def in_fork(fn: Callable[[], Any], plugins: str | None) -> Any:
    """``fn()`` in a forked child with ``VLLM_PLUGINS=plugins`` (None: unset, every plugin); its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of the parent's state, only its result down the pipe
        os.close(read_end)
        status = 1
        try:
            os.environ.pop("VLLM_PLUGINS", None)
            if plugins is not None:
                os.environ["VLLM_PLUGINS"] = plugins
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(json.dumps(fn()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"the child with VLLM_PLUGINS={plugins} failed ({status})"
    return json.loads(data)

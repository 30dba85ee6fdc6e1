"""Run a function in a forked process, its JSON result back through a pipe.

vLLM loads its plugins once per process, so each plugin set under test needs a
process of its own; an interpreter importing vLLM costs about 12 s, an engine
start less. So the scripts that compare plugin sets import vLLM once, with no
plugin loaded, and fork a process per set, which sets ``VLLM_PLUGINS`` and
loads the plugins itself, as a fresh process would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


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

"""The engine count printed at the end of a run (tests/conftest.py) counts what vLLM starts, once each; the CPU
time beside it adds up what the run's processes used."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import REPO, EngineCounter

# Stand-ins under names of their own, so that the session's counter does not count them: a process titled
# like vLLM's engine process, living long enough to be seen by a counter polling every POLL_S (the session's
# polls twice a second, for processes that live tens of seconds).
POLL_S = 0.05
TITLE, VARIABLE = "TEST::EngineCore", "TEST_ENGINE_MULTIPROCESSING"
ENGINE_CORE = f"import setproctitle, time; setproctitle.setproctitle('{TITLE}'); time.sleep(0.5)"
# A script whose engine runs in its own process, and a child of it (inheriting the environment).
IN_PROCESS = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(0.5)'])"
PLAIN = "import time; time.sleep(0.5)"
BUSY_S = 0.5
BUSY = f"import time; end = time.process_time() + {BUSY_S}\nwhile time.process_time() < end: pass\ntime.sleep(0.3)"


def test_counts_engine_processes_and_in_process_engines_once_each() -> None:
    counter = EngineCounter(TITLE, VARIABLE, POLL_S)
    in_process = {**os.environ, VARIABLE: "0"}
    children = [
        subprocess.Popen([sys.executable, "-c", ENGINE_CORE]),
        subprocess.Popen([sys.executable, "-c", IN_PROCESS], env=in_process),
        subprocess.Popen([sys.executable, "-c", PLAIN]),
    ]
    for child in children:
        child.wait(timeout=60)
    time.sleep(POLL_S * 4)  # a last poll
    seconds, engines, _ = counter.stop()
    assert engines == 2  # the titled one, and the in-process script (not its child, not the plain process)
    assert seconds >= 0.5


# Run in a fresh interpreter: the counter adds up every descendant of its process, and a pytest worker's own
# descendants include the session's servers.
CPU_PROBE = f"""
import subprocess, sys
from tests.conftest import REPO, EngineCounter
counter = EngineCounter({TITLE!r}, {VARIABLE!r}, {POLL_S!r})
children = [subprocess.Popen([sys.executable, "-c", {BUSY!r}]), subprocess.Popen([sys.executable, "-c", {PLAIN!r}])]
for child in children:
    child.wait(timeout=60)
_, engines, cpu = counter.stop()
print(engines, cpu)
"""


def test_adds_up_the_cpu_time_of_every_descendant() -> None:
    """A child burning 0.5 s of CPU (then idle for several polls, so a poll sees all of it) and a sleeping one."""
    done = subprocess.run([sys.executable, "-c", CPU_PROBE], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    engines, cpu = done.stdout.split()
    assert int(engines) == 0
    assert BUSY_S <= float(cpu) < BUSY_S + 1.0  # the busy child's, plus two interpreters' start-up

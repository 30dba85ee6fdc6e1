"""Shared fixtures: the demo assets, one real server per test session, a real S3 API (moto), a real PostgreSQL.

The server is the real thing: ``loraserve serve`` in a subprocess, with the real
vLLM engine on the CPU, the demo adapters on disk, and HTTP on a free port.
Engines are what make the suite slow, so the run ends with its duration and the
number of engines it started (``pytest -m "not engine"`` starts none).
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from xdist.scheduler import LoadFileScheduling

from tests.postgres import PG_BIN, PostgresCluster

REPO = Path(__file__).resolve().parents[1]
DEMO_ROOT = REPO / ".demo"
SERVER_START_TIMEOUT_S = 300
HEALTH_POLL_S = 0.2  # a server is up within this of answering: ~0.4 s less per start than a poll a second
ENGINE_PROCESS_TITLE = "VLLM::EngineCore"  # vLLM's name for the process that runs an engine
IN_PROCESS_ENGINE = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": the engine runs in the process that starts it


class EngineCounter:
    """Counts the vLLM engines this session starts, whoever starts them (servers, load tests, scripts).

    vLLM runs each engine in a process it titles ``VLLM::EngineCore``; a thread looks for them among
    this process's descendants twice a second (an engine lives for tens of seconds, so none is missed).
    A script run with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs its engine in its own process, untitled:
    that process is counted instead.

    The same polls add up the CPU time of every descendant (the workers, their servers, engines and
    scripts), as last seen: whether a run's wall time is CPU (two workers busy on two cores: more workers
    would only share them) or waiting (engines idle between requests: a third worker could use it) is
    in the summary, not a guess. A process's last half second is missed, so it is a lower bound.
    """

    def __init__(
        self, title: str = ENGINE_PROCESS_TITLE, in_process: str = IN_PROCESS_ENGINE, poll_s: float = 0.5
    ) -> None:
        self.title, self.in_process, self.poll_s = title, in_process, poll_s  # poll_s: shorter in its own tests
        self.started = time.monotonic()
        self.engines: set[tuple[int, float]] = set()  # (pid, create time): a reused pid is another process
        self.cpu: dict[tuple[int, float], float] = {}  # (pid, create time) -> user + system seconds, last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-counter", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.poll_s):
            for process in me.children(recursive=True):
                try:
                    key = (process.pid, process.create_time())
                    times = process.cpu_times()
                    self.cpu[key] = times.user + times.system
                    if self._is_engine(process):
                        self.engines.add(key)
                except psutil.Error:  # gone between listing and reading: seen on an earlier poll if it ran
                    continue

    def _is_engine(self, process: psutil.Process) -> bool:
        if " ".join(process.cmdline()).startswith(self.title):
            return True
        # The process a test started with the engine in-process (its children inherit the variable).
        parent = process.parent()
        return process.environ().get(self.in_process) == "0" and (
            parent is None or self.in_process not in parent.environ()
        )

    def stop(self) -> tuple[float, int, float]:
        """(seconds since the session started, engines started, CPU seconds of every descendant)."""
        self._stop.set()
        self._thread.join()
        return time.monotonic() - self.started, len(self.engines), sum(self.cpu.values())


ENGINE_COUNTER = pytest.StashKey[EngineCounter]()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        atexit.register(_exit_without_finalizing)  # registered first, so it runs after every other exit handler


def _exit_without_finalizing() -> None:
    """End an xdist worker once its exit handlers ran, without the interpreter's finalization.

    A worker has sent its last report (and the controller decides the run from the reports, not from the
    worker's exit status) when it exits; what is left is tearing down its heap: torch, vLLM and transformers
    with ~700,000 objects, a last full garbage collection over them, and their libraries' destructors,
    3-9 s per worker at the end of the unit run (the controller waits for both). Leaving that to the
    operating system skips it, and with it the leak report nanobind prints at finalization for triton's
    objects (see ``pytest_collection``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # the run's process: its counter sees the workers' descendants
        session.config.stash[ENGINE_COUNTER] = EngineCounter()
    _one_core_per_worker()
    _one_torch_thread_per_worker()


OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU list for its engine's torch threads


def _one_core_per_worker() -> None:
    """Under ``-n N``, the engines a worker starts run their torch thread on a core of their own.

    vLLM's automatic binding puts every CPU engine's thread on the same core (one per physical core
    from the first, the last kept for other processes): on a 2-core machine both workers' engines
    shared core 0 while core 1 ran only the API processes and pytest. Worker ``gwK`` binds its engines
    to core K (modulo the cores this process may use), one thread each as before, so two engines that
    run at once use both cores. Servers, scripts and load tests inherit the variable; a variable set
    outside the run is left alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...; unset without -n
    if worker is None or OMP_BIND in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    os.environ[OMP_BIND] = str(cores[int(worker.removeprefix("gw")) % len(cores)])


def _one_torch_thread_per_worker() -> None:
    """Under ``-n N``, the torch work a worker runs itself (references, LoRA ops, BitNet kernels, the demo
    outputs) runs on one thread, as the engines do.

    With torch's default (a thread per core) two workers run four threads on two cores beside their
    engines: every op then waits at OpenMP barriers for a thread that is not running, and spins while
    it waits, taking a core from the other worker's engine. The ops are small, so a second thread buys
    little even on an idle machine; measured under load, the LoRA ops and BitNet unit tests
    (tests/lora_ops/test_punica_cpu.py, test_slots.py, tests/bitnet/test_quant.py) took 25-26 s of CPU
    with two threads and 15-17 s with one. Subprocesses (servers, scripts) set their own."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    import torch

    torch.set_num_threads(1)


SHARED_SERVERS: dict[str, tuple[str, ...]] = {
    "server": (
        *(
            f"tests/e2e/test_{name}.py"
            for name in ("faults", "lora_info_metric", "metrics_and_disconnect", "openai_api", "reference", "routing")
        ),
        "tests/loadtests/test_locust.py",
    ),
    "secure": ("tests/e2e/test_security.py", "tests/e2e/test_security_metrics.py", "tests/e2e/test_fuzz.py"),
    "limited": tuple(f"tests/e2e/test_security_{name}.py" for name in ("files", "limits", "tenants")),
    "admin": ("tests/e2e/test_adapter_admin.py", "tests/e2e/test_adapter_loaded_metric.py"),
    "project_engine": ("tests/e2e/test_engine_refusal.py", "tests/e2e/test_mixed_batch.py"),
}
"""The modules of each session server or engine (``server`` here; ``secure``, ``limited``, ``admin`` and the script run
``project_engine`` in tests/e2e/conftest.py)."""
_UNIT_OF = {module: server for server, modules in SHARED_SERVERS.items() for module in modules}
SERVER_ENDERS = ("tests/e2e/test_faults.py", "tests/e2e/test_fuzz.py")
"""Modules whose tests leave their session server unusable (test_faults.py kills the engine of ``server``) or changed
where other modules must not look (test_fuzz.py changes the routes and adapters of ``secure`` at random): they run
after every other test of the run, so after every test of their server, whatever subset is run and however it is
split among workers. The server's last job saves a start of its own."""


def _unit(nodeid: str) -> str:
    """The work unit of a test under ``make test``: its module, or the server its module shares."""
    module = nodeid.partition("::")[0]
    return _UNIT_OF.get(module, module)


class SharedServerScheduling(LoadFileScheduling):
    """``--dist loadfile``, with the modules of one session server as one unit: one worker runs them
    all, so the server starts once per run instead of once per worker. (pytest-xdist's own
    ``--dist loadgroup`` would do it from markers, but under pytest 9.2 the group it appends to the
    test ids is lost and every test is scheduled alone: pytest-dev/pytest-xdist#1386.)"""

    def _split_scope(self, nodeid: str) -> str:
        return _unit(nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadFileScheduling | None:
    if config.getvalue("dist") != "loadfile":
        return None
    missing = [module for module in (*_UNIT_OF, *SERVER_ENDERS) if not (REPO / module).is_file()]
    assert not missing, f"SHARED_SERVERS or SERVER_ENDERS name modules that do not exist: {missing}"
    return SharedServerScheduling(config, log)


ENGINE_ONLY = "tests/e2e/"
"""Every test under it starts a server or an engine, marked ``engine``: ``make test-unit`` does not collect it
(``--ignore``), so its workers do not import those modules' clients (openai, schemathesis, ~2.3 CPU-s each), and
``pytest_collection_modifyitems`` refuses an unmarked test there, which that run would silently leave out."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the work units of ``make test`` (``-n 2 --dist loadfile --no-loadscope-reorder``): the
    workers take them in the order of their first test, the next one when their current one is almost
    done. First one unit that needs the demo assets (on a fresh clone its worker builds them, on one
    core); then the long units that do not (the other worker runs them meanwhile); then the long units
    that need the demo; the quick units last. Long units go longest first: the shared servers' units
    (several modules on one server), then the units that start an engine, then those with slow tests;
    collection order within each. The quick units (the unit tests: seconds each, minutes in all) fill
    the end, so that whichever worker finishes its last long unit first takes them while the other
    still runs its own, and the two finish within seconds of each other instead of one engine unit.
    The tests of ``SERVER_ENDERS`` go last of all: a worker takes a unit at its first test, so their
    unit keeps its place, and they run after the rest of it.
    """
    unmarked = [
        item.nodeid for item in items if item.nodeid.startswith(ENGINE_ONLY) and not item.get_closest_marker("engine")
    ]
    if unmarked:
        raise pytest.UsageError(
            f"tests under {ENGINE_ONLY} must be marked engine (make test-unit skips it): {unmarked}"
        )
    units = [_unit(item.nodeid) for item in items]
    needs_demo = {unit for unit, item in zip(units, items) if "demo_assets" in getattr(item, "fixturenames", ())}
    engine = {unit for unit, item in zip(units, items) if item.get_closest_marker("engine")}
    slow = {unit for unit, item in zip(units, items) if item.get_closest_marker("slow")}
    first = next((unit for unit in units if unit in needs_demo), None)

    def rank(unit: str) -> tuple[int, int]:
        if unit == first:
            return 0, 0
        length = 0 if unit in SHARED_SERVERS else 1 if unit in engine else 2 if unit in slow else 3
        if length == 3:  # quick: the filler at the end
            return 3, (0 if unit in needs_demo else 1)
        return (2 if unit in needs_demo else 1), length

    ranks = {unit: rank(unit) for unit in units}
    ends = {item.nodeid: item.nodeid.partition("::")[0] in SERVER_ENDERS for item in items}
    # stable: collection order within a rank
    items.sort(key=lambda item: (ends[item.nodeid], ranks[_unit(item.nodeid)]))


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[object]:
    """Collect with the garbage collector off, then take what collection left alive (the modules of torch, vLLM,
    transformers, ...) out of its scans, as the server does with its start-up heap
    (``serving.api.app.freeze_startup_heap``).

    A worker that collected the suite holds ~700,000 tracked objects, alive until it exits. Importing them, the
    collector ran full collections that found next to nothing (~2.5 of each worker's 15-20 CPU-s of collection);
    after it, each full collection scanned them all, ~0.5 s of CPU, and the unit run had ~60 of them (the tests'
    own ``gc.collect()`` calls and the collector's): ~20 s of its CPU. Frozen, they are no longer scanned; what a
    test creates is collected as before (refcounting still frees frozen objects), pytest's own collections after
    the run too. Outside a worker they are unfrozen at the interpreter's exit, which frees them (frozen, nanobind
    reports triton's objects as leaked); a worker skips finalization (``_exit_without_finalizing``)."""
    gc.disable()
    try:
        return (yield)
    finally:
        gc.enable()
        gc.collect()  # collection's garbage first: a frozen cycle would never be collected
        gc.freeze()
        if os.environ.get("PYTEST_XDIST_WORKER") is None:  # a worker skips finalization instead
            atexit.register(gc.unfreeze)


@pytest.hookimpl(trylast=True)  # the last lines of the run, after pytest's own summaries
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    counter = config.stash.get(ENGINE_COUNTER, None)
    if counter is not None:
        seconds, engines, cpu = counter.stop()
        cores = len(os.sched_getaffinity(0))
        summary = (
            f"loraserve tests: {seconds / 60:.1f} min ({seconds:.0f} s), {engines} engine starts, "
            f"{cpu:.0f} CPU-s in subprocesses ({cpu / (seconds * cores):.0%} of {cores} cores)"
        )
        terminalreporter.write_sep("=", summary)


@pytest.fixture(scope="session")
def demo_assets():
    """Built once into the repo's .demo/ (idempotent: a manifest marks a finished build)."""
    from checkpoints.assets import build_demo_assets

    return build_demo_assets(DEMO_ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(demo_assets, **engine_overrides) -> dict:
    """The dev config pointed at the built demo assets, with test-sized engine settings.

    Eager (``enforce_eager``) unless a test overrides it: compiling the model costs
    every engine start tens of seconds; test_dense_batch.py runs the compiled engine."""
    config = yaml.safe_load((REPO / "configs" / "dev.yaml").read_text())
    config["model"]["path"] = str(demo_assets.base)
    for adapter in config["adapters"]:
        adapter["path"] = str(demo_assets.adapters[adapter["name"]])
    routing = config.get("routing") or {}
    if routing.get("routes_file"):  # relative to configs/, but the test config is written elsewhere
        routing["routes_file"] = str(REPO / "configs" / routing["routes_file"])
    config["engine"].update({"enforce_eager": True} | engine_overrides)
    config["server"]["port"] = free_port()
    return config


def use_api_keys(config: dict, workdir: Path, entries: list[dict]) -> None:
    """Turn on ``auth.mode: api_keys`` in ``config`` with a keys file of ``entries`` written to ``workdir``."""
    keys_file = workdir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": entries}))
    config["auth"] = {"mode": "api_keys", "keys_file": str(keys_file)}


@dataclass
class RunningServer:
    url: str
    config: dict
    process: subprocess.Popen
    log_path: Path

    @property
    def base_model(self) -> str:
        return self.config["model"]["name"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(config: dict, workdir: Path, env: dict | None = None) -> RunningServer:
    """Start ``loraserve serve`` and wait until /health answers 200."""
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "server.log"
    port = config["server"]["port"]
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(config_path)],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    server = RunningServer(url=f"http://127.0.0.1:{port}", config=config, process=process, log_path=log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    # One client for every poll: ``httpx.get`` builds a client (and its TLS context) per call, ~25 ms of CPU
    # under load, five times a second for the whole start.
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-5000:]}")
            try:
                if client.get(f"{server.url}/health").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(HEALTH_POLL_S)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {SERVER_START_TIMEOUT_S}s:\n{server.log()[-5000:]}")


def stop_server(server: RunningServer) -> None:
    """SIGTERM (an orderly shutdown), and wait until the server exited (30 s, then SIGKILL)."""
    server.process.terminate()
    _reap(server.process)


def _reap(process: subprocess.Popen) -> None:
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_RETIRED: list[subprocess.Popen] = []


def retire_server(server: RunningServer) -> None:
    """``stop_server`` for a fixture's teardown, without the wait: SIGTERM now, reaped at the end of the session.

    The server shuts down in order as before, but vLLM's shutdown waits out timeouts of its own (about 5 s
    until its worker and engine processes are gone), which the tests after it need not wait for. A test
    that needs the server gone before it goes on (a restart on the same store) calls ``stop_server``."""
    server.process.terminate()
    _RETIRED.append(server.process)


@pytest.hookimpl(trylast=True)  # after the session's fixtures were torn down, retiring their servers
def pytest_sessionfinish(session: pytest.Session) -> None:
    while _RETIRED:
        _reap(_RETIRED.pop())


@pytest.fixture(scope="session")
def server(demo_assets, tmp_path_factory) -> Iterator[RunningServer]:
    """One real server for the session, configured like configs/dev.yaml (max_loras=2).

    ``make test`` runs the modules that use it on one worker (``SHARED_SERVERS``), so it starts once; its last
    test kills its engine (test_faults.py, one of ``SERVER_ENDERS``)."""
    running = start_server(demo_config(demo_assets), tmp_path_factory.mktemp("server"))
    yield running
    retire_server(running)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible HTTP server in this process (moto), with credentials in the environment.

    What moto's ``ThreadedMotoServer`` runs (its WSGI app and request handler in werkzeug's threaded server), with
    the server's loop polling for shutdown every 0.02 s instead of ``serve_forever``'s 0.5 s: stopping it waited
    0.2-0.5 s at the end of every worker that ran an S3 test."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test-key", AWS_SECRET_ACCESS_KEY="test-secret", AWS_DEFAULT_REGION="us-east-1")
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", free_port(), app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL 15 cluster for the session (``tests/postgres.py``); an error where none is installed.

    Its directory is made with ``tempfile`` rather than ``tmp_path_factory``: the server runs as the
    ``postgres`` user, which cannot enter pytest's root-only temporary directories."""
    if not PostgresCluster.available():  # a requirement of the suite, like Python: a skip would hide every test
        raise RuntimeError(f"the tests need PostgreSQL 15 at {PG_BIN} (Debian: apt install postgresql-15)")
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="loraserve-pg-")))
    yield cluster
    cluster.close()


@pytest.fixture(scope="session", autouse=True)
def quick_listener_close() -> Iterator[None]:
    """The PostgreSQL change feed's listener stops waiting for notifications every 0.02 s in this process instead of
    every 0.2 s (``adapter_store.changes.POLL_S``): ``close()`` waits for it, up to a poll, and every store on
    PostgreSQL closes one (test_catalog, test_changes, test_registry_fleet and test_uploads: 33 s in one process,
    28 s with this). Notifications end a wait at once either way, and the safety net's ``refresh_s`` is checked as
    often or more. Servers the tests start keep the product's value."""
    import adapter_store.changes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapter_store.changes, "POLL_S", 0.02)
        yield


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> Iterator[str]:
    """The URL of a new, empty database on the session's cluster (one per test: tests stay independent), given
    back after the test (emptied and renamed for a later test: ``PostgresCluster.give_back``)."""
    url = postgres.database()
    yield url
    postgres.give_back(url)

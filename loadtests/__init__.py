"""Load tests and benchmarks: everything that drives a running server, or the engine, to measure it.

``loraserve loadtest`` runs ``locustfile`` headless against a server it starts
(``runner``, with ``process`` for the subprocess and ``summary`` for vLLM's
benchmark fields). The ``bench_*`` modules are the benchmarks behind every
figure in the README (``python -m loadtests.bench_lora`` ...); ``soak`` runs a
long load for leaks, and ``naive_server`` is the transformers + PEFT baseline
the alternatives benchmark compares against; ``synthetic_run`` is the set-up
the benchmarks on a synthetic model share (``bench_cold``, ``bench_swap``,
``bench_cold_mix``). Results go to ``results/``.

The runner talks to the server only through processes and HTTP, so the CLI's
``loadtest`` command pulls nothing of the server into this package: ``runner``,
``process``, ``summary`` and ``locustfile`` never import ``serving``
(``tests/test_boundaries.py``); the benchmarks may (its settings, its store).
"""

"""Load testing: ``loraserve loadtest`` runs ``loadtests/locustfile.py`` headless and summarises it.

``summary`` holds the pure math (vLLM's benchmark fields from raw records),
``process`` starts and stops a server subprocess, ``runner`` ties them to locust.
"""

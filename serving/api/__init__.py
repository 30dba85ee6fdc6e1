"""OpenAI-compatible HTTP API, in two layers and one composition root.

* Endpoint packages, one per API area (``chat``, ``completions``, ``models``,
  ``system``, ``prompt_routes``, ``adapters``): a thin ``api_router``, a pydantic
  ``protocol`` and one ``serving`` class. Each imports only the shared layer.
* The shared layer, the modules directly here: ``errors`` (the one error shape),
  ``protocol`` (request fields every generation endpoint takes), ``sampling``,
  ``generation`` (the base of the generation endpoints), ``streams``,
  ``disconnect``, ``limits``, ``auth``, ``logprobs``, and the selection of the adapter a
  request names. It imports no endpoint.
* ``app``: builds every serving object onto ``app.state`` and attaches every
  package's routes; the only module that knows them all.

``tests/serving/api/test_layers.py`` holds the code to these rules.
"""

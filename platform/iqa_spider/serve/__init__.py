"""Online serving with Ray Serve: the model and the grounding head behind an HTTP API.

- :mod:`.config`: the typed application config (``ServeAppConfig``, job kind ``serve``) and
  how Serve's ``args`` become one;
- :mod:`.api`: the FastAPI app (routes, JSON errors), :mod:`.requests` (reading a request
  within the limits) and :mod:`.schemas` (the documented request and response shapes);
- :mod:`.deployments`: the Ray Serve deployments (model with dynamic batching, grounding
  head, ingress);
- :mod:`.app`: ``build_app(args)``, what ``serve run`` / ``serve deploy`` import.

Importing this package or :mod:`.config` never imports Ray or torch.
"""

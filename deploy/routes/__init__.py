"""The server's URLs, one router per audience. Each handler is a small function that checks the request and
hands off to the `Service` (deploy/service.py); grep a URL to find its handler.

    v2     the Open Inference Protocol (KServe v2): GET /v2, /v2/health/live, /v2/health/ready,
           /v2/models/{name}[/versions/{version}], .../ready; POST .../infer
    api    the web page and what it calls: GET /, POST /api/predict, GET /api/model
    ops    operators: GET /metrics, POST /admin/reload
    deps   what a handler gets from the app: the service, the settings, the metrics

`deploy.server.create_app` includes the routers in that order. Handlers carry comments rather than docstrings:
FastAPI would publish a docstring as the route's OpenAPI description.
"""

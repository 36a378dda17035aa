"""Serving of exported ONNX models: the model server (KServe v2 protocol, upload endpoint, web page, hot swap
on the registry's champion), batch prediction, and Triton / KServe / container files.

Built on `tasks.inference` (ONNX Runtime session, metadata, the preprocessing contract, batch prediction) and
`tasks.registry` (the champion alias): neither imports torch or prefect, and neither does anything here, so the
serving container stays small (deploy/Dockerfile). docs/serving.md is the guide.

    protocol     the v2 wire format (JSON and binary tensors), pure functions
    batching     running the model for concurrent requests (micro-batching on or off)
    service      the served model: preprocess -> predict -> postprocess, and the hot swap
    observability  Prometheus metrics, JSON logs, the access log
    monitor      drift monitoring: the window, the test off the request path, the alarm (tasks/drift.py: the statistics)
    retrain      what an alarm does: save the drifted images (opt-in), start the retraining deployment (Prefect REST)
    routes/      each URL's handler, by audience: v2 (the protocol), api (upload, model info, the page), ops
    guards       the body-size limit and the bearer token;  errors: every error as {"error": ...}
    connection   HTTP limits uvicorn lacks: a deadline and a size cap for request headers
    decode       uploaded images decoded within a memory budget (reduced to the input size where possible)
    settings     what the server can be set to (`Settings`)
    server       the app composed from those (`create_app`) and `python -m deploy.server`
    predict      `finetune predict` (streaming batch prediction)
    drift_batch  `finetune drift FOLDER` (a folder against a model's drift reference)
    triton       `finetune export-triton` (a Triton model repository)
"""

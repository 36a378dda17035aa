"""Serving of exported ONNX models (KServe v2 protocol, hot swap) lands here in a later issue.

It builds on `tasks.inference` (ONNX Runtime session, metadata, the preprocessing contract, batch
prediction) and `tasks.registry` (the champion alias): neither imports torch or prefect.
"""

"""Serving of exported ONNX models (KServe v2 protocol, hot swap) lands here in a later issue.

It will read models from the registry and preprocess with `tasks.images.load_for_model`,
the same function training uses.
"""

"""Export stage: `stage` (the stage), `onnx_graph` (the graph and its metadata), `int8` (optional
INT8 model), `card` + `model_card.md.j2` (the model card)."""

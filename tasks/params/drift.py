"""The `drift` params section (read by the export stage): the reference sample the model server's drift monitoring
compares traffic with (tasks/drift.py, docs/serving.md "Drift monitoring"). In its own module to keep `schema` short;
`schema` imports it into `Params`. The server's own knobs (window, test interval, alpha, alarms in a row, the
retraining trigger) are `finetune serve` options: they belong to a deployment, not to the model."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class DriftParams(BaseModel):
    """What the export stage records for drift monitoring, beside the model (models/drift_reference.npz). The model
    always gets the `embedding` output (its pooled features, after `logits` and `probabilities`) and the reference."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # as schema.Strict

    components: Annotated[int, Field(ge=1, le=1024)] = Field(
        32, description="principal components of the embeddings the server tests (one KS test each, Bonferroni)")
    fit_images: Annotated[int, Field(ge=2, le=1_000_000)] = Field(
        1000, description="at most this many training images (evenly spaced) fit the PCA")
    reference_images: Annotated[int, Field(ge=2, le=1_000_000)] = Field(
        2000, description="at most this many validation images (evenly spaced) form the reference sample the "
        "server's windows are compared with (the validation split: outputs on images the weights never trained on)")

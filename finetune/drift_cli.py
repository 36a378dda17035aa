"""`finetune drift`: test a folder of images against the champion's (or any model's) drift reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.options import ParamsOpt, RegistryOpt, friendly, registry_root


@friendly
def drift_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Image files, folders (walked recursively) and manifests "
                                                     "(.csv/.parquet with a 'path' column).")],
    model: Annotated[str, typer.Option("--model", "-m", help="'champion', a registry version (3, v3, v0003) or an "
                                                              "ONNX file exported by this pipeline.")] = "champion",
    alpha: Annotated[float, typer.Option(min=1e-12, max=0.5, help="Drift when the test's p-value (Bonferroni over "
                                         "components, classes, image statistics and the detectors) is below "
                                         "this.")] = 0.01,
    max_images: Annotated[int, typer.Option(min=2, help="Test at most this many images (the first found).")] = 10_000,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding images.")] = 4,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the result as JSON here.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    registry_: RegistryOpt = None,
) -> None:
    """Do these images look like what the model was trained for? One test of all of them against the model's drift
    reference: the server's statistics (KS on the principal components of the model's embedding, on its
    probabilities and on the images' brightness, contrast and sharpness; docs/serving.md "Drift monitoring"). Exit 1
    when drift is detected, 0 when not."""
    from deploy.drift_batch import check
    from tasks.files import write_json

    found = check(model, list(paths), registry_root(params, override=registry_), alpha, max_images, workers)
    p = found.result.pvalues
    ref = found.reference
    typer.echo(f"{found.images} images ({found.unreadable} unreadable) vs the reference of "
               f"{found.version or found.model} ({ref['n']} {ref.get('reference_split', '')} images, "
               f"{ref['components']} components)")
    image = f", image {p['image']:.3g}" if "image" in p else ""
    typer.echo(f"p-values: embedding {p['embedding']:.3g}, softmax {p['softmax']:.3g}{image}, combined "
               f"{p['combined']:.3g} (alpha {alpha:g})")
    if out is not None:
        write_json(out, found.to_dict())
    typer.echo("DRIFT: these images differ from what the model was trained for" if found.result.reject
               else "no drift detected")
    raise typer.Exit(1 if found.result.reject else 0)

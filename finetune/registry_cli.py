"""`finetune promote`, `finetune rollback` and `finetune registry ...`: the model registry by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.options import ParamsOpt, RegistryOpt, friendly, registry_root

@friendly
def promote_cmd(
    version: Annotated[Optional[str], typer.Argument(help="Version to make champion (3, v3, v0003); default: the newest.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    registry_: RegistryOpt = None,
) -> None:
    """Make a registered version the champion (the alias moves atomically; the old champion goes onto the
    history, so `finetune rollback` can bring it back). By hand: no gate is consulted."""
    from tasks import registry

    root = registry_root(params, override=registry_)
    try:
        registry.read_champion(root)
        damaged = None
    except registry.DamagedAlias as exc:  # promoting by hand is the repair
        damaged = str(exc).split("; repair")[0]
    alias, changed = registry.promote(root, version, reason="promoted by hand (finetune promote)", by_hand=True)
    previous = alias["history"][-1] if alias["history"] else "none"
    if damaged:
        typer.echo(f"champion: {alias['version']} (the alias is repaired; it was damaged: {damaged})  [{root}]")
        return
    typer.echo(f"champion: {alias['version']}" + (f" (was {previous})" if changed else " (already the champion)")
               + f"  [{root}]")


@friendly
def rollback_cmd(params: ParamsOpt = Path("params.yaml"), registry_: RegistryOpt = None) -> None:
    """Move the champion alias back to the previous champion."""
    from tasks import registry

    root = registry_root(params, override=registry_)
    before = registry.read_champion(root)
    alias = registry.rollback(root, reason="finetune rollback")
    typer.echo(f"champion: {alias['version']} (rolled back from {before['version'] if before else '?'})  [{root}]")


registry_app = typer.Typer(help="The model registry: numbered versions and the champion alias (docs/registry.md).",
                           no_args_is_help=True)


@registry_app.command("list")
@friendly
def registry_list(params: ParamsOpt = Path("params.yaml"), registry_: RegistryOpt = None) -> None:
    """Versions, oldest first, with their test metrics; `*` marks the champion."""
    from tasks import registry

    root = registry_root(params, override=registry_)
    versions = registry.list_versions(root)
    if not versions:
        typer.echo(f"registry {root}: no versions yet")
        return
    try:
        alias, damaged = registry.read_champion(root), None
    except registry.DamagedAlias as exc:  # still list: the listing is how to choose the version that repairs it
        alias, damaged = None, str(exc)
    champ = alias["version"] if alias else None
    typer.echo("   version  created                    accuracy  macro_f1  source    onnx sha256")
    for v in versions:
        try:
            meta = registry.read_metadata(root, v)
        except registry.RegistryError as exc:
            typer.echo(f"{'*' if v == champ else ' '}  {v:7}  ({exc})")
            continue
        m = meta.get("metrics") or {}
        fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"  # noqa: E731
        typer.echo(f"{'*' if v == champ else ' '}  {v:7}  {str(meta.get('created_at', '?')):25}  "
                   f"{fmt(m.get('accuracy')):8}  {fmt(m.get('macro_f1')):8}  {str(meta.get('source', '?')):8}  "
                   f"{str(meta.get('onnx_sha256', ''))[:12]}")
    if damaged:  # listed above so the repairing version can be chosen; still an error for scripts
        typer.echo(f"error: champion: none usable: {damaged}", err=True)
        raise typer.Exit(1)
    typer.echo(f"champion: {champ or 'none'}" + (f" (history: {', '.join(alias['history'])})"
                                                 if alias and alias["history"] else "") + f"  [{root}]")


@registry_app.command("add")
@friendly
def registry_add(
    onnx_path: Annotated[Path, typer.Argument(help="An ONNX model exported by this pipeline (its metadata is read).")],
    model_card: Annotated[Optional[Path], typer.Option(help="Its model card (Markdown).")] = None,
    note: Annotated[str, typer.Option(help="Why it is registered by hand.")] = "",
    params: ParamsOpt = Path("params.yaml"),
    registry_: RegistryOpt = None,
) -> None:
    """Register an ONNX model by hand (e.g. the first champion when gates.first_run is 'block');
    `finetune promote VERSION` then makes it champion."""
    from tasks import promote

    root = registry_root(params, override=registry_)
    version, created = promote.register_file(onnx_path, root, model_card=model_card, note=note)
    typer.echo(f"{'registered as' if created else 'already registered as'} {version}  [{root}]")

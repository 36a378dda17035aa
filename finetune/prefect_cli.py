"""`finetune prefect up|deploy|down|status`: a local Prefect server (the dashboard) and worker for this project,
and the deployments of prefect.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.options import WorkdirOpt, friendly, load

prefect_app = typer.Typer(help="A local Prefect server (the dashboard) and process worker for this project, in the "
                          "background, and the deployments of prefect.yaml (docs/orchestration.md).",
                          no_args_is_help=True)
PortOpt = Annotated[Optional[int], typer.Option(help="Server port; default: the one last used here, else 4200.")]


@prefect_app.command("up")
@friendly
def prefect_up(
    port: PortOpt = None,
    pool: Annotated[str, typer.Option(help="The process work pool the worker serves (prefect.yaml names it).")] = "finetune",
    query_seconds: Annotated[float, typer.Option(help="How often the worker polls for runs.")] = 10.0,
    workdir: WorkdirOpt = Path("."),
) -> None:
    """Start the server (loopback) and a process worker in the background.

    What already runs is left alone. Logs, PIDs and the server's database are in .prefect-local/."""
    from finetune import local_prefect as lp

    local = lp.Local.of(workdir, port)
    server, worker = lp.start_server(local), lp.start_worker(local, pool, query_seconds)
    typer.echo(f"Prefect server (pid {server}) and worker (pid {worker}, pool '{pool}') are up; logs in {local.state}\n"
               f"dashboard: {local.ui_url}\nfor prefect commands: export PREFECT_API_URL={local.api_url}")


@prefect_app.command("deploy")
@friendly
def prefect_deploy(port: PortOpt = None, workdir: WorkdirOpt = Path(".")) -> None:
    """Register the deployments of prefect.yaml on the local server, and the notifications.

    The manual run (the dashboard form) and the scheduled retraining; notifications from
    orchestration.webhook (off when null)."""
    from finetune import local_prefect as lp

    local = lp.Local.of(workdir, port)
    if not lp.healthy(local):
        raise lp.LocalPrefectError(f"no Prefect server answers at {local.api_url}: run `finetune prefect up` first")
    typer.echo(lp.deploy(local).strip())
    with lp.prefect_api(workdir):
        from flows import notify

        typer.echo(notify.configure(load(workdir / "params.yaml").orchestration.webhook))


@prefect_app.command("down")
@friendly
def prefect_down(workdir: WorkdirOpt = Path(".")) -> None:
    """Stop the worker, then the server (SIGTERM, then SIGKILL after a grace period)."""
    from finetune import local_prefect as lp

    for line in lp.stop(lp.Local.of(workdir)):
        typer.echo(line)


@prefect_app.command("status")
@friendly
def prefect_status(workdir: WorkdirOpt = Path(".")) -> None:
    """Whether the local server and worker run, and where."""
    from finetune import local_prefect as lp

    for key, value in lp.status(lp.Local.of(workdir)).items():
        typer.echo(f"{key}: {value}")

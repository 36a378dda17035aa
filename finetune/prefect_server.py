"""`prefect server start`, with SQLite write transactions that wait their turn instead of failing.

Prefect begins its SQLite transactions DEFERRED: a transaction reads, then writes. When another connection commits in
between (the server's own event persister, a worker's poll), SQLite refuses the upgrade to a write at once with
"database is locked" (no busy wait: waiting there could deadlock), and the API answers 503. The dashboard's Submit
does not retry, so the run a person asked for is not created: 5 of 150 back-to-back `create_flow_run` calls on an
idle 2-core machine, and both clicks of a CI run under load (upstream: PrefectHQ/prefect#18934, #19771).
`BEGIN IMMEDIATE` takes the write lock when the transaction starts, so it waits (Prefect's busy_timeout, 60 s) for
the writer before it instead. Reads outside transactions are unchanged; a PostgreSQL server is not touched.

`finetune prefect up` starts the server as `python -m finetune.prefect_server server start ...`: the same CLI, this
one change applied first."""

from __future__ import annotations

from contextlib import asynccontextmanager


def immediate_sqlite_transactions() -> None:
    """Make every transaction Prefect's SQLite configuration begins an IMMEDIATE one."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    deferred = AioSqliteConfiguration.begin_transaction
    if getattr(deferred, "immediate", False):
        return

    @asynccontextmanager
    async def begin_transaction(self, session, with_for_update: bool = False):
        async with deferred(self, session, with_for_update=True) as transaction:
            yield transaction

    begin_transaction.immediate = True
    AioSqliteConfiguration.begin_transaction = begin_transaction


if __name__ == "__main__":
    immediate_sqlite_transactions()
    from prefect.cli import app

    app()

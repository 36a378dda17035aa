"""Named crash points, for tests that kill a stage at a deterministic place (never on a timer).

`FINETUNE_CRASH_AT=<name>` makes the process SIGKILL itself when execution reaches `crash_point(name)`.
Names say where they are, e.g. `train:step:stage=1:epoch=0:batch=3` (before that optimizer step) or
`ingest:copied` (images copied, manifest not written yet). Unset, a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "FINETUNE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

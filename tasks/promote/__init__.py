"""Promote stage: `stage` (the verdict and candidate checks, registering, moving the champion alias) and
`serving_check` (the infra check: the candidate served by the real server in a subprocess; torch-free, and what
tests and benchmarks use to run a server process).

`finetune registry add` registers a file by hand through `register_file`."""
from tasks.promote.stage import PromotionRefused, register_file, run

__all__ = ["PromotionRefused", "register_file", "run"]

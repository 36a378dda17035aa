"""Label-issues stage: likely label errors (confident learning on frozen pretrained features), near-duplicates
across splits and outliers, between fetch_model and train.

Modules, one job each: `scan` (the checks on computed features: out-of-fold probabilities, cleanlab, cosine
near-duplicates, nearest-neighbour outliers), `report` (JSON, Markdown, thumbnail grid, flagged-rows manifest),
`stage` (`run`, `inspect`, `main`). The features come from the shared `tasks.features` (cached by content).
"""

from tasks.label_issues.scan import Findings, scan
from tasks.label_issues.stage import (
    LabelIssuesBlocked,
    blocked_message,
    inspect,
    main,
    run,
    verdict,
)

__all__ = ["Findings", "LabelIssuesBlocked", "blocked_message", "inspect", "main", "run", "scan", "verdict"]

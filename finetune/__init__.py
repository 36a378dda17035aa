"""The `finetune` command line (the top layer: imports tasks, flows and deploy)."""

"""Stage logic of the fine-tuning pipeline: plain functions, one module per stage, no Prefect."""

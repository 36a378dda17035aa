from finetune.cli import app

app()

"""Run folders: checkpoints, a run's model and tokenizer, model-only runs, `--init-from`, resume.

Everything that reads or writes a run folder without training sits here, below the trainer, so
eval, export, densify, soup, convert and data scoring never import the training loop.
"""

"""The training loop, schedules, checkpoints and evaluation."""

from sltrain.train.loop import train

__all__ = ["train"]

"""Parameter and memory accounting: counts by formula and bytes by tensor, never guessed."""

from sltrain.measure.memory import MemoryBreakdown, PeakMemory, estimate_memory, measure_memory, rss_bytes
from sltrain.measure.params import count_parameters

__all__ = [
    "MemoryBreakdown", "count_parameters", "estimate_memory", "measure_memory", "PeakMemory",
    "rss_bytes",
]

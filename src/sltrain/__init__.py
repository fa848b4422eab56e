"""sltrain: parameter- and memory-efficient pretraining of LLaMA-style language models.

Implements SLTrain ("SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining", NeurIPS 2024) and the family of methods around it behind one interface.
"""

__version__ = "0.1.0"

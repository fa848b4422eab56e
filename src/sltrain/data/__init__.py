"""Data: corpora and Hub streams, the tokenizer, packed token streams and the block sampler.

The pipeline itself (corpus -> split -> tokenizer -> cached token streams) is `data.pipeline`.
"""

from sltrain.data.packing import Blocks, BlockSampler
from sltrain.data.pipeline import PreparedData, prepare, prepare_options, write_token_folder
from sltrain.data.tokenizer import load_tokenizer, save_tokenizer

__all__ = ["PreparedData", "prepare", "prepare_options", "write_token_folder", "Blocks",
           "BlockSampler", "load_tokenizer", "save_tokenizer"]

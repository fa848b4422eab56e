"""Packing token streams into fixed-length blocks, and a resumable sampler over them.

Documents are joined with an EOS token after each, then cut into blocks of seq_len + 1 tokens
that overlap by one token (inputs and next-token targets), as in nanoGPT.
"""

from __future__ import annotations

import numpy as np
import torch

from sltrain.errors import UserError


def pack(token_lists: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    """Documents' tokens joined with an EOS after each.

    An EOS a document spells out in its text ("</s>" in a web page) is dropped, so that EOS marks
    document ends only and a stream can be cut at any of them (`tokens.cut`).
    """
    parts = []
    tail = np.array([eos], dtype=dtype)
    for tokens in token_lists:
        ids = np.asarray(tokens, dtype=dtype)
        parts += [ids[ids != eos], tail]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


class Blocks:
    """View of a packed stream (an array or a read-only memmap) as `len(self)` blocks of (input,
    target) sequences."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([self.tokens[i * T : i * T + T + 1] for i in indices]).astype(np.int64)
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1], rows_t[:, 1:]


VAL_SLICES = ("all", "tune", "report")


def held_out_slice(tokens: np.ndarray, seq_len: int, which: str) -> np.ndarray:
    """The part of a validation stream that evaluation reads: "all" the whole stream (the same
    array), "tune" its first half of blocks, "report" the rest.

    `sltrain bench` picks learning rates on "tune" and reports on "report". The report part
    starts one token after the tune part ends, so that not even the target token of the tune
    part's last block is an input of the report part. The halves are of whole blocks of
    `seq_len`, so runs of the same data and `seq_len` cut the stream at the same token.
    """
    if which == "all":
        return tokens
    cut = len(Blocks(tokens, seq_len)) // 2 * seq_len + 1
    return tokens[:cut] if which == "tune" else tokens[cut:]


class BlockSampler:
    """Random batches of blocks, a new permutation each epoch; its position is checkpointed."""

    def __init__(self, blocks: Blocks, batch_size: int, seed: int, split: str = "train"):
        if len(blocks) < batch_size:
            raise UserError(
                f"the {split} split has {len(blocks)} blocks of {blocks.seq_len + 1} tokens, fewer "
                f"than one batch of {batch_size}; lower --batch-size or --seq-len, or add data"
            )
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.blocks), generator=g)

    def next_batch(self, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; with `world` > 1, slice `rank` of it (every rank draws the same
        indices, so the slices never overlap and together are the single-process batch)."""
        if self.position + self.batch_size > len(self.blocks):
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        per_rank = self.batch_size // world
        return self.blocks.batch(idx[rank * per_rank : (rank + 1) * per_rank].tolist())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._perm = self._permutation()

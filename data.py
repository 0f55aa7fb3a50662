"""
Token data for training: the train.bin / val.bin memmaps written by prepare_owt.py,
and random (B, T) batches drawn from them.

Sampling uses a dedicated torch.Generator (not the global RNG), so train.py can
save its state in every checkpoint and a resumed run draws exactly the batches
an uninterrupted run would have drawn.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch


class TokenData:
    """The prepared token files of one directory, as read-only uint16 memmaps."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        missing = [s for s in ("train", "val") if not os.path.isfile(os.path.join(data_dir, f"{s}.bin"))]
        if missing:
            raise FileNotFoundError(
                f"no {' or '.join(s + '.bin' for s in missing)} in {data_dir!r}. Prepare the data first, e.g. "
                f"`python prepare_owt.py --out {data_dir}` (OpenWebText) or "
                f"`python prepare_owt.py --dataset ../shared/data/tinyshakespeare.txt --out {data_dir}`.")
        self.meta = {}
        meta_path = os.path.join(data_dir, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                self.meta = json.load(f)
        dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.splits = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=dtype, mode="r")
                       for s in ("train", "val")}

    def num_tokens(self, split: str) -> int:
        return len(self.splits[split])

    def check_block_size(self, block_size: int) -> None:
        for split, arr in self.splits.items():
            if len(arr) <= block_size + 1:
                raise ValueError(f"{self.data_dir}/{split}.bin holds {len(arr)} tokens, fewer than "
                                 f"block_size + 2 = {block_size + 2}; use a smaller block_size or more data "
                                 "(e.g. a larger --val-fraction in prepare_owt.py)")

    def sample_offsets(self, split: str, block_size: int, shape: tuple[int, ...],
                       generator: torch.Generator) -> torch.Tensor:
        """Random start positions of `shape` (e.g. (micro_steps, batch_size)) in `split`."""
        high = self.num_tokens(split) - block_size - 1
        return torch.randint(high + 1, shape, generator=generator)

    def batch(self, split: str, offsets: torch.Tensor, block_size: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y, both (B, T) int64, for the B start positions in `offsets`.

        On CUDA the batch is pinned and copied with non_blocking=True, so the copy
        overlaps with whatever the GPU is still running."""
        arr = self.splits[split]
        rows = np.stack([arr[o:o + block_size + 1] for o in offsets.tolist()]).astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if torch.device(device).type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.to(device), y.to(device)

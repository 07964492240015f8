"""Real data that ships with the Python install or a package: nothing is downloaded."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import nn


def python_source_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """Bytes of the standard library's ``.py`` files in sorted path order (identical on every rank)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def digits_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (ships with the package), as 3 x size x size floats."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target).long()


def digits_split(held_out: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8x8 digits as 64 floats in [0, 1]: ``(x_train, y_train, x_held_out, y_held_out)``, the last
    ``held_out`` share of a fixed shuffle held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(12345).permutation(len(data.target))
    x = torch.tensor(data.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target[order], dtype=torch.int64)
    cut = int((1 - held_out) * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


class ByteBatches:
    """Random windows of a rank's shard of the corpus; a fixed held-out tail for evaluation."""

    def __init__(self, rank: int, world: int, batch: int, context: int, seed: int):
        data = python_source_bytes()
        split = int(0.95 * data.numel())
        self.train = data[:split][rank::world]
        self.held_out = data[split:]
        self.batch, self.context = batch, context
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def windows(self, data: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.stack([data[o : o + self.context + 1] for o in offsets.tolist()])

    def next(self) -> torch.Tensor:
        offsets = torch.randint(0, self.train.numel() - self.context - 1, (self.batch,), generator=self.gen)
        return self.windows(self.train, offsets)

    def evaluation(self, batches: int = 8) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(12345)
        return [self.windows(self.held_out, torch.randint(0, self.held_out.numel() - self.context - 1,
                                                          (self.batch,), generator=gen))
                for _ in range(batches)]


class ByteWindowDataset(torch.utils.data.Dataset):
    """``count`` fixed windows of ``context`` bytes of the corpus, as ``{"input_ids", "labels"}`` (a
    causal LM shifts the labels itself): the map-style dataset the trainers' samplers shard."""

    def __init__(self, count: int = 512, context: int = 64, seed: int = 0):
        data = python_source_bytes()
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, data.numel() - context, (count,), generator=gen)
        self.windows = torch.stack([data[o : o + context] for o in offsets.tolist()])

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


class DigitBatches:
    """Random batches of a rank's shard of the upsampled digits; the last 197 images held out."""

    def __init__(self, rank: int, world: int, batch: int, seed: int):
        x, y = digits_images()
        self.train_x, self.train_y = x[:1600][rank::world], y[:1600][rank::world]
        self.test_x, self.test_y = x[1600:], y[1600:]
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.train_x.shape[0], (self.batch,), generator=self.gen)
        return self.train_x[idx], self.train_y[idx]

    def evaluation(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.test_x, self.test_y)]


def interface_tx_bytes(interface: str | None) -> int:
    """Bytes sent so far on a network interface (the emulated node's link), 0 when not given."""
    if not interface:
        return 0
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())

"""Per-sample randomness: every random start or choice of an attack is a counter-based
hash of (seed, attack, restart, sample id, element), so a verdict never depends on the batch
a sample came in, its position there, or which other attacks ran before."""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Union

import torch

from gdws_deploy.errors import GdwsError


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch holds."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: int64 -> int64, a bijection that scrambles every bit."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _label_key(label: Union[str, int]) -> int:
    """A stable 64-bit key for a label (Python's hash() changes between processes)."""
    digest = hashlib.blake2b(str(label).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class SampleRandom:
    """Random numbers for a batch that depend only on each sample's key: its id in the data
    set, the base seed and the labels forked in (attack, restart, purpose). Vectorized: a
    counter-based hash (splitmix64) of (key, element index), no generator state."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys

    @classmethod
    def of(
        cls, seed: int, sample_ids: Optional[torch.Tensor], count: int, device=None
    ) -> SampleRandom:
        """Keys for samples `sample_ids` (default 0..count-1) under `seed`."""
        ids = torch.arange(count) if sample_ids is None else torch.as_tensor(sample_ids)
        if ids.shape != (count,):
            raise GdwsError(f"sample_ids has shape {tuple(ids.shape)}, expected ({count},)")
        base = _mix(torch.tensor(_label_key(f"seed {int(seed)}"), dtype=torch.int64))
        return cls(_mix(base ^ _mix(ids.to(device=device, dtype=torch.int64) * _GOLDEN)))

    def fork(self, *labels: Union[str, int]) -> SampleRandom:
        """Independent streams per label: fork('apgd-ce', restart)."""
        keys = self.keys
        for label in labels:
            keys = _mix(keys ^ _label_key(label))
        return SampleRandom(keys)

    def subset(self, index: torch.Tensor) -> SampleRandom:
        return SampleRandom(self.keys[index])

    def uniform(self, *shape: int) -> torch.Tensor:
        """(N, *shape) floats in (0, 1), 24 random bits each."""
        count = math.prod(shape)
        counter = torch.arange(1, count + 1, device=self.keys.device) * _GOLDEN
        bits = _shift_right(_mix(self.keys[:, None] + counter[None, :]), 40)
        return ((bits.float() + 0.5) / (1 << 24)).reshape(len(self.keys), *shape)

    def normal(self, *shape: int) -> torch.Tensor:
        """(N, *shape) standard normals (Box-Muller)."""
        u = self.uniform(2, *shape)
        return torch.sqrt(-2 * torch.log(u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])

    def integers(self, high: torch.Tensor, *shape: int) -> torch.Tensor:
        """(N, *shape) integers in [0, high), high broadcasting against that shape."""
        return (self.uniform(*shape) * high).long().clamp_max(high - 1)


def stream(
    name: str, x: torch.Tensor, sample_ids: Optional[torch.Tensor], seed: int, restart: int
) -> SampleRandom:
    """The random stream of attack `name`'s restart `restart` on samples `sample_ids`
    (default 0..N-1) of batch `x`."""
    return SampleRandom.of(seed, sample_ids, len(x), x.device).fork(name, restart)

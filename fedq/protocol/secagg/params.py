"""The parameters of secure aggregation, named and defaulted as Flower's ``SecAggPlusWorkflow``.

``num_shares`` is the size of each client's neighbourhood, the client itself included (it
keeps one share of its own secrets and hands one to each of its ``num_shares - 1``
neighbours); ``reconstruction_threshold`` is how many of those shares rebuild a secret.
Updates are clipped to ``[-clipping_range, clipping_range]`` and quantised to integers in
``[0, quantization_range - 1]``; masks are uniform modulo ``modulus_range`` (fixed at 2^32, so
arithmetic is plain uint32 wrap-around). Sample counts are capped at ``max_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedq.errors import ConfigError

MODULUS = 2**32


@dataclass(frozen=True)
class SecAggParams:
    """One round's secure-aggregation parameters (public: every client and the aggregator agree)."""

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = MODULUS
    max_weight: float = 1000.0

    @classmethod
    def from_options(cls, *, neighbours: int, threshold: int, clip: float = 8.0, bits: int = 22,
                     max_weight: float = 1000.0) -> SecAggParams:
        """From fedq's options: ``neighbours`` others per client, ``bits`` of quantisation."""
        if not isinstance(bits, int) or not 1 <= bits <= 31:
            raise ConfigError(f"secagg bits must be an integer in [1, 31], got {bits!r}")
        return cls(num_shares=neighbours + 1, reconstruction_threshold=threshold, clipping_range=clip,
                   quantization_range=2**bits, max_weight=max_weight)

    @property
    def neighbours(self) -> int:
        """How many other clients each client shares its secrets with and masks against."""
        return self.num_shares - 1

    @property
    def bits(self) -> int:
        """log2 of ``quantization_range``."""
        return self.quantization_range.bit_length() - 1

    def check(self, clients: int) -> SecAggParams:
        """Refuse parameters that cannot give an exact, private sum for ``clients`` clients."""
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"secure aggregation: {msg}")

        if self.modulus_range != MODULUS:
            raise bad(f"modulus_range must be 2^32, got {self.modulus_range}")
        q = self.quantization_range
        if not isinstance(q, int) or q < 2 or q & (q - 1):
            raise bad(f"quantization_range must be a power of two >= 2, got {q!r}")
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise bad(f"clipping_range must be a positive number, got {self.clipping_range!r}")
        if not (math.isfinite(self.max_weight) and self.max_weight >= 1):
            raise bad(f"max_weight must be a number >= 1, got {self.max_weight!r}")
        if clients < 2:
            raise bad(f"needs at least 2 clients, got {clients}")
        k = self.neighbours
        if not 1 <= k <= clients - 1:
            raise bad(f"neighbours must be in [1, {clients - 1}] for {clients} clients, got {k}")
        if k < clients - 1 and k % 2:
            raise bad(f"neighbours must be even (or {clients - 1}, everyone), got {k}")
        t = self.reconstruction_threshold
        if not 2 <= t <= self.num_shares:
            raise bad(f"threshold must be in [2, {self.num_shares}] (neighbours + 1), got {t}")
        if t <= self.num_shares // 2:
            # Fewer would let two disjoint groups each rebuild a client's secrets: one its self
            # mask, the other its mask key, which unmasks that client's input alone.
            raise bad(f"threshold must be more than half of neighbours + 1 ({self.num_shares}), got {t}")
        if clients * (q - 1) >= MODULUS:
            raise bad(f"{clients} clients x 2^{self.bits} levels overflow 2^32: lower secagg bits")
        return self

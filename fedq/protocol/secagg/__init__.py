"""Secure aggregation (SecAgg+, Bell et al., CCS 2020): the pure protocol core.

The aggregator and Redis see only masked vectors; only their sum over the surviving clients
can be unmasked. Numpy and ``cryptography`` only: no Redis, no machine learning.

- ``params``: the parameters, named and defaulted as Flower's ``SecAggPlusWorkflow``.
- ``quantise``: fixed point modulo 2^32 with clipping; sample weighting as an extra coordinate.
- ``shamir``: threshold sharing of 32-byte secrets over a prime field, verified reconstruction.
- ``agreement``: X25519 key pairs, HKDF-derived pairwise seeds, sealed share bundles.
- ``prg``: seeds expanded to uint32 mask vectors (ChaCha20 keystream).
- ``graph``: the k-regular communication graph (``neighbours``).
- ``masking``: a client's masked input; the aggregator's unmasking of the survivors' sum.
- ``rounds``: one client's side and the aggregator's side of a round, as pure steps.

See docs/explanation/secure-aggregation.md for the threat model and the math.
"""

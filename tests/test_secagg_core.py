"""Secure aggregation's building blocks: parameters, fixed point, Shamir, key agreement, PRG, graph."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.errors import ConfigError, SecAggError
from fedq.protocol.secagg import agreement, shamir
from fedq.protocol.secagg.graph import neighbours
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.prg import expand
from fedq.protocol.secagg.quantise import decode_sum, dequantise_sum, encode_input, quantise, weight_of

FEW = settings(max_examples=40, deadline=None)
P = SecAggParams.from_options(neighbours=4, threshold=3)


def test_defaults_are_flowers() -> None:
    p = SecAggParams(num_shares=5, reconstruction_threshold=3)
    assert (p.clipping_range, p.quantization_range, p.modulus_range, p.max_weight) == (8.0, 2**22, 2**32, 1000.0)
    assert (p.bits, p.neighbours) == (22, 4)


@pytest.mark.parametrize(("kwargs", "clients", "match"), [
    ({"neighbours": 3, "threshold": 3}, 10, "even"),
    ({"neighbours": 4, "threshold": 2}, 10, "more than half"),
    ({"neighbours": 4, "threshold": 6}, 10, r"threshold must be in \[2, 5\]"),
    ({"neighbours": 12, "threshold": 8}, 10, r"neighbours must be in \[1, 9\]"),
    ({"neighbours": 4, "threshold": 3, "bits": 30}, 10, "overflow"),
    ({"neighbours": 4, "threshold": 3, "clip": 0.0}, 10, "clipping_range"),
    ({"neighbours": 1, "threshold": 2}, 1, "at least 2 clients"),
])
def test_bad_parameters_are_refused_by_name(kwargs: dict, clients: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecAggParams.from_options(**kwargs).check(clients)


def test_odd_neighbours_are_fine_when_everyone_is_a_neighbour() -> None:
    assert SecAggParams.from_options(neighbours=5, threshold=4).check(6).num_shares == 6


@FEW
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=50))
def test_quantise_is_within_half_a_step_inside_the_clip(values: list[float]) -> None:
    x = np.array(values)
    back = dequantise_sum(quantise(x, P), 1, P)
    step = 2 * P.clipping_range / (P.quantization_range - 1)
    assert np.all(np.abs(back - np.clip(x, -8, 8)) <= step / 2 + 1e-12)


def test_stochastic_rounding_is_unbiased() -> None:
    scale = (P.quantization_range - 1) / (2 * P.clipping_range)
    x = np.full(200_000, 0.123)
    exact = (0.123 + P.clipping_range) * scale  # not an integer: nearest rounding is off by a fraction
    q = quantise(x, P, np.random.default_rng(1)).astype(np.float64)
    assert set(np.unique(q)) == {np.floor(exact), np.ceil(exact)}
    assert abs(q.mean() - exact) < 0.01


def test_weighted_mean_and_weight_come_back() -> None:
    a, b = [np.array([[1.0, -2.0]]), np.array([0.5])], [np.array([[3.0, 2.0]]), np.array([-0.5])]
    total = encode_input(a, 100, P) + encode_input(b, 300, P)
    mean, weight = decode_sum(total, 2, [(1, 2), (1,)], P)
    assert weight == pytest.approx(0.4, abs=1e-5)
    np.testing.assert_allclose(mean[0], [[2.5, 1.0]], atol=1e-4)
    np.testing.assert_allclose(mean[1], [-0.25], atol=1e-4)


def test_counts_are_capped_and_checked() -> None:
    assert weight_of(5000, P) == 1.0
    for bad in (0, -3, 2.5, True, "7"):
        with pytest.raises(SecAggError, match="bad_count"):
            weight_of(bad, P)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="bad_update"):
        encode_input([np.array([np.nan])], 10, P)


def test_a_sum_out_of_range_is_refused_not_decoded() -> None:
    total = np.array([2 * (P.quantization_range - 1) + 1], dtype=np.uint32)
    with pytest.raises(SecAggError, match="sum_out_of_range"):
        dequantise_sum(total, 2, P)


@FEW
@given(st.binary(min_size=32, max_size=32), st.integers(2, 7), st.data())
def test_any_threshold_subset_rebuilds_the_secret(secret: bytes, t: int, data: st.DataObject) -> None:
    holders = data.draw(st.lists(st.integers(1, 1000), min_size=t, max_size=9, unique=True))
    shares = shamir.split(secret, holders, t)
    subset = data.draw(st.lists(st.sampled_from(holders), min_size=t, max_size=len(holders), unique=True))
    got = shamir.recover({x: shares[x] for x in subset}, t, lambda s: s == secret)
    assert got.secret == secret and got.bad_holders == ()


def test_too_few_shares_fail_by_name() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    with pytest.raises(SecAggError, match="too_few_shares: seed: 2 shares revealed, 3 needed"):
        shamir.recover({1: shares[1], 4: shares[4]}, 3, lambda s: True, "seed")


def test_a_bad_share_is_outvoted_and_named_or_the_rebuild_fails() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    shares[2] = (int.from_bytes(shares[2], "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big")
    got = shamir.recover(shares, 3, lambda s: s == secret)
    assert got.secret == secret and got.bad_holders == (2,)
    with pytest.raises(SecAggError, match="inconsistent_shares"):
        shamir.recover({x: shares[x] for x in (1, 2, 3)}, 3, lambda s: s == secret)


@pytest.mark.parametrize("share", [b"", b"x" * 66 + b"y", b"\xff" * 66, "text"])
def test_malformed_shares_are_refused(share: object) -> None:
    with pytest.raises(SecAggError, match="bad_share"):
        shamir.recover({1: share, 2: bytes(66), 3: bytes(66)}, 2, lambda s: True)  # type: ignore[dict-item]


def test_both_ends_agree_and_every_pair_round_and_purpose_differs() -> None:
    a, b, c = agreement.KeyPair.generate(), agreement.KeyPair.generate(), agreement.KeyPair.generate()
    ab = agreement.agree(a.private, b.public, "mask", "r", 1, "a", "b")
    assert ab == agreement.agree(b.private, a.public, "mask", "r", 1, "b", "a")
    others = {agreement.agree(a.private, c.public, "mask", "r", 1, "a", "c"),
              agreement.agree(a.private, b.public, "mask", "r", 2, "a", "b"),
              agreement.agree(a.private, b.public, "channel", "r", 1, "a", "b")}
    assert ab not in others and len(others) == 3
    assert agreement.public_key(a.private) == a.public
    with pytest.raises(SecAggError, match="low-order"):
        agreement.agree(a.private, bytes(32), "mask", "r", 1, "a", "b")


def test_sealed_bundles_open_only_for_their_key_and_context() -> None:
    key = os.urandom(32)
    sealed = agreement.seal(key, b"shares", b"a->b")
    assert agreement.open_sealed(key, sealed, b"a->b", "x") == b"shares"
    for k, aad, blob in ((os.urandom(32), b"a->b", sealed), (key, b"a->c", sealed),
                         (key, b"a->b", sealed[:-1] + bytes([sealed[-1] ^ 1])), (key, b"a->b", b"short")):
        with pytest.raises(SecAggError, match="bad_ciphertext"):
            agreement.open_sealed(k, blob, aad, "x")


def test_prg_is_deterministic_per_seed_and_checks_its_seed() -> None:
    s = os.urandom(32)
    assert np.array_equal(expand(s, 1000), expand(s, 1000))
    assert np.array_equal(expand(s, 10), expand(s, 1000)[:10])
    assert not np.array_equal(expand(s, 1000), expand(os.urandom(32), 1000))
    assert expand(s, 0).dtype == np.uint32
    with pytest.raises(SecAggError, match="bad_seed"):
        expand(b"short", 4)


@pytest.mark.parametrize(("n", "k"), [(2, 1), (5, 4), (9, 2), (10, 4), (30, 6), (7, 9)])
def test_the_graph_is_k_regular_symmetric_and_shared(n: int, k: int) -> None:
    ids = [f"c{i}" for i in range(n)]
    g = neighbours(ids, k, b"seed")
    assert g == neighbours(list(reversed(ids)), k, b"seed")
    assert all(len(v) == min(k, n - 1) and c not in v for c, v in g.items())
    assert all(c in g[p] for c, v in g.items() for p in v)
    if k < n - 1:
        assert neighbours(ids, k, b"other") != g

"""Secure aggregation rounds in memory: exact sums through dropouts, safe failure beyond, masks that hide."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.secagg import SecAggRound

from fedq.errors import SecAggError
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import MASK_KEY, SELF_MASK
from fedq.protocol.secagg.quantise import decode_sum, decode_update, encode_input, encode_update

SHAPES = [(3, 2), (4,)]


def _inputs(ids: list[str], seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rng = np.random.default_rng(seed)
    counts = {c: int(rng.integers(1, 2000)) for c in ids}
    params = SecAggParams.from_options(neighbours=2, threshold=2)
    inputs = {c: encode_input([rng.normal(0, 2, s) for s in SHAPES], counts[c], params, rng) for c in ids}
    return inputs, counts


def _expected(inputs: dict[str, np.ndarray], survivors: set[str]) -> np.ndarray:
    return np.sum([inputs[c].astype(np.uint64) for c in survivors], axis=0).astype(np.uint32)


@pytest.mark.parametrize(("n", "k", "t"), [(5, 4, 3), (6, 5, 4), (4, 3, 3)])
def test_complete_graph_exact_up_to_n_minus_t_dropouts_then_fails(n: int, k: int, t: int) -> None:
    params = SecAggParams.from_options(neighbours=k, threshold=t)
    ids = [f"c{i:02d}" for i in range(n)]
    inputs, _ = _inputs(ids)
    for dropped in range(n - t + 2):
        for gone in itertools.islice(itertools.combinations(ids, dropped), 3):
            r = SecAggRound(n, params)
            if dropped <= n - t:
                got = r.run(inputs, drop_before_input=gone)
                assert np.array_equal(got.total, _expected(inputs, set(ids) - set(gone))), (dropped, gone)
                assert got.survivors == n - dropped and got.bad_holders == {}
            else:
                with pytest.raises(SecAggError, match="too_few"):
                    r.run(inputs, drop_before_input=gone)


def test_sparse_graph_with_drops_at_every_stage() -> None:
    params = SecAggParams.from_options(neighbours=4, threshold=3)
    r = SecAggRound(10, params)
    ids = list(r.clients)
    inputs, counts = _inputs(ids, 1)
    got = r.run(inputs, drop_before_share=["c00"], drop_before_input=["c03"], drop_before_reveal=["c07"])
    survivors = set(ids) - {"c00", "c03"}
    assert np.array_equal(got.total, _expected(inputs, survivors))
    mean, weight = decode_sum(got.total, got.survivors, SHAPES, params)
    assert [m.shape for m in mean] == SHAPES
    assert weight == pytest.approx(sum(min(counts[c], 1000) for c in survivors) / 1000, abs=1e-4)


def test_a_dropped_client_with_too_few_live_neighbours_fails_the_round() -> None:
    params = SecAggParams.from_options(neighbours=2, threshold=2)
    r = SecAggRound(8, params)
    inputs, _ = _inputs(list(r.clients), 2)
    r.run(inputs)  # a full round, to learn the graph (it is fixed by the seed and the roster)
    assert r.record is not None
    victim, near = "c00", sorted(r.record.graph()["c00"])[0]
    # The victim and one of its two neighbours drop: one share of the victim's mask key is left.
    with pytest.raises(SecAggError, match=f"too_few_shares: {victim}'s mask key: 1 shares revealed, 2 needed"):
        SecAggRound(8, params).run(inputs, drop_before_input=[victim, near])


def test_masked_inputs_look_uniform_and_plain_ones_do_not() -> None:
    params = SecAggParams.from_options(neighbours=4, threshold=3)
    r = SecAggRound(6, params)
    x = np.zeros(1 << 14, dtype=np.uint32) + np.uint32(params.quantization_range // 2)  # a most structured input
    r.run({c: x for c in r.clients})
    for y in [*r.masked.values()]:
        assert _byte_chi2(y) < 380 and _bit_bias(y) < 6, "a masked vector is not uniform"
    assert _byte_chi2(x) > 10_000 and _bit_bias(x) > 100, "the test cannot tell"


def _byte_chi2(v: np.ndarray) -> float:
    """Chi-square of the byte frequencies against uniform (255 df: mean 255, sd 22.6; 380 is p < 1e-6)."""
    counts = np.bincount(v.view(np.uint8), minlength=256)
    expected = v.nbytes / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _bit_bias(v: np.ndarray) -> float:
    """The largest z-score over the 32 bit positions of how often each bit is set."""
    bits = (v[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    n = v.size
    return float(np.max(np.abs(bits.sum(axis=0) - n / 2) / np.sqrt(n / 4)))


def test_an_altered_share_is_outvoted_or_the_round_fails() -> None:
    params = SecAggParams.from_options(neighbours=4, threshold=3)
    r = SecAggRound(5, params)
    inputs, _ = _inputs(list(r.clients), 3)
    r.run(inputs)
    survivors = set(r.masked)
    kind, share = r.reveals["c01"]["c02"]
    assert kind == SELF_MASK
    tampered = {h: dict(v) for h, v in r.reveals.items()}
    tampered["c01"]["c02"] = (kind, bytes([share[0] ^ 1]) + share[1:])
    got = r.unmask(survivors, tampered)
    assert np.array_equal(got.total, _expected(inputs, survivors)) and got.bad_holders == {"c02": ["c01"]}
    only_three = {h: tampered[h] for h in ("c01", "c02", "c03")}  # no spare share to outvote it
    with pytest.raises(SecAggError, match="inconsistent_shares: c02's self-mask seed"):
        r.unmask(survivors, only_three)


def test_shares_of_the_wrong_kind_are_never_used() -> None:
    params = SecAggParams.from_options(neighbours=4, threshold=3)
    r = SecAggRound(5, params)
    inputs, _ = _inputs(list(r.clients), 4)
    r.run(inputs)
    wrong = {h: {o: (MASK_KEY, s) for o, (_, s) in v.items()} for h, v in r.reveals.items()}
    with pytest.raises(SecAggError, match="too_few_shares: c00's self-mask seed: 0 shares"):
        r.unmask(set(r.masked), wrong)


def test_a_client_that_masks_with_another_seed_than_it_shared_fails_the_round() -> None:
    params = SecAggParams.from_options(neighbours=4, threshold=3)
    r = SecAggRound(5, params)
    inputs, _ = _inputs(list(r.clients), 5)
    r.run(inputs)
    cheat = r.clients["c04"]
    honest_seed, cheat.self_seed = cheat.self_seed, bytes(32)
    r.masked["c04"] = cheat.masked(inputs["c04"], set(r.clients))
    cheat.self_seed = honest_seed
    got = r.unmask(set(r.masked), r.reveals)
    with pytest.raises(SecAggError, match="sum_out_of_range"):
        decode_sum(got.total, got.survivors, SHAPES, params)


def test_a_client_reveals_once_and_only_with_enough_survivors() -> None:
    params = SecAggParams.from_options(neighbours=4, threshold=3)
    r = SecAggRound(5, params)
    inputs, _ = _inputs(list(r.clients), 6)
    r.run(inputs)
    with pytest.raises(SecAggError, match="already_revealed"):
        r.clients["c00"].reveal(set(r.masked), set(r.clients), {})
    fresh = SecAggRound(5, params)
    roster = {c: p.advertise() for c, p in fresh.clients.items()}
    for p in fresh.clients.values():
        p.share(roster, fresh.graph_seed)
    with pytest.raises(SecAggError, match="too_few_survivors"):
        fresh.clients["c00"].reveal({"c00", "c01"}, set(roster), {})


@settings(max_examples=12, deadline=None)
@given(st.integers(3, 7), st.data())
def test_any_dropouts_give_the_exact_sum_or_a_clear_failure(n: int, data: st.DataObject) -> None:
    k = n - 1 if n <= 4 else data.draw(st.sampled_from([k for k in (2, 4, n - 1) if k <= n - 1]))
    t = data.draw(st.integers((k + 1) // 2 + 1, k + 1))
    params = SecAggParams.from_options(neighbours=k, threshold=t)
    r = SecAggRound(n, params)
    ids = list(r.clients)
    inputs, _ = _inputs(ids, n)
    gone = data.draw(st.lists(st.sampled_from(ids), max_size=n, unique=True))
    try:
        got = r.run(inputs, drop_before_input=gone)
    except SecAggError as e:
        assert e.reason in {"too_few_survivors", "too_few_shares"}
        return
    assert np.array_equal(got.total, _expected(inputs, set(ids) - set(gone)))


def test_the_unmasked_model_is_the_weighted_mean_of_the_survivors_models() -> None:
    params = SecAggParams.from_options(neighbours=4, threshold=3)
    r = SecAggRound(6, params)
    rng = np.random.default_rng(8)
    base = [rng.normal(0, 1, (4, 3)).astype(np.float32), rng.normal(0, 1, 3).astype(np.float32)]
    models = {c: [(b + rng.normal(0, 0.1, b.shape)).astype(np.float32) for b in base] for c in r.clients}
    counts = {c: 50 * (i + 1) for i, c in enumerate(r.clients)}
    inputs = {c: encode_update(models[c], base, counts[c], params) for c in r.clients}
    got = r.run(inputs, drop_before_input=["c02"])
    new, weight = decode_update(got.total, got.survivors, base, params)
    alive = [c for c in r.clients if c != "c02"]
    want = [sum(counts[c] * models[c][i].astype(np.float64) for c in alive) / sum(counts[c] for c in alive)
            for i in range(len(base))]
    assert weight == pytest.approx(sum(counts[c] for c in alive) / params.max_weight, abs=1e-5)
    for n, w, b in zip(new, want, base):
        assert n.dtype == b.dtype and n.shape == b.shape
        np.testing.assert_allclose(n, w, atol=1e-4)  # fixed point: a step is 16 / 2^22
    with pytest.raises(SecAggError, match="bad_update"):
        encode_update(models["c00"][:1], base, 10, params)

"""Guarantee (3): a client whose shares or masked input do not match what it committed to is found
out, or the round fails by name -- never a wrong sum.

What a client commits to before anyone reveals anything: its mask public key (in the roster) and a
hash of its self-mask seed (with its shares). Every secret the aggregator rebuilds is checked
against one of those, so shares of anything else never reach the sum. Revealed shares that were
altered are covered in test_secagg_rounds (outvoted and named, or the round fails).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

import msgpack
import numpy as np
import pytest
import redis
from support.secagg import SecAggRound

from fedq.errors import SecAggError, UpdateRejected
from fedq.learning.spec import RunSpec
from fedq.protocol import messages
from fedq.protocol.secagg import agreement, shamir
from fedq.protocol.secagg.participant import Advert, Participant, bundle_aad
from fedq.protocol.secagg.quantise import encode_input
from fedq.protocol.store import RunStore
from fedq.roles.secure import WIRE_NAME, SecureSum, wire_template

PARAMS = RunSpec(clients=5, rounds=1, secure_aggregation=True, run_id="sa-cheats",
                 secagg_neighbours=4, secagg_threshold=3).validate().secagg_params()


def _round(seed: int) -> tuple[SecAggRound, dict[str, np.ndarray]]:
    r = SecAggRound(5, PARAMS)
    rng = np.random.default_rng(seed)
    return r, {c: encode_input([rng.normal(0, 1, (4, 3))], 100 + i, PARAMS) for i, c in enumerate(r.clients)}


def _expected(inputs: dict[str, np.ndarray], survivors: set[str]) -> np.ndarray:
    return np.sum([inputs[c].astype(np.uint64) for c in survivors], axis=0).astype(np.uint32)


def _sharing(p: Participant, *, seed: bytes | None = None, key: bytes | None = None) -> None:
    """Make ``p`` hand out shares of another self-mask seed or mask key than the ones it commits to
    (its commitment, its advertised public key and its masked input stay the honest ones)."""
    honest_share = p.share

    def share(roster: Mapping[str, Advert], graph_seed: bytes) -> tuple[bytes, dict[str, bytes]]:
        real_seed, real_keys = p.self_seed, p.mask_keys
        p.self_seed = seed or real_seed
        p.mask_keys = agreement.KeyPair(key or real_keys.private, real_keys.public)
        _, bundles = honest_share(roster, graph_seed)
        p.self_seed, p.mask_keys = real_seed, real_keys
        return agreement.commit(real_seed, p.run_id, p.round_no, p.me), bundles

    p.share = share  # type: ignore[method-assign]


def test_shares_of_another_self_mask_seed_fail_the_round_by_name() -> None:
    r, inputs = _round(1)
    _sharing(r.clients["c02"], seed=os.urandom(32))
    with pytest.raises(SecAggError, match="inconsistent_shares: c02's self-mask seed: no 3 of the 5 shares"):
        r.run(inputs)


def test_shares_of_another_mask_key_fail_the_round_once_that_client_drops() -> None:
    r, inputs = _round(2)
    _sharing(r.clients["c02"], key=agreement.KeyPair.generate().private)
    with pytest.raises(SecAggError, match="inconsistent_shares: c02's mask key: no 3 of the 4 shares"):
        r.run(inputs, drop_before_input=["c02"])
    # While it survives its mask key is never rebuilt: the round is exact.
    r, inputs = _round(2)
    _sharing(r.clients["c02"], key=agreement.KeyPair.generate().private)
    assert np.array_equal(r.run(inputs).total, _expected(inputs, set(r.clients)))


def test_a_bad_share_given_to_one_neighbour_is_outvoted_and_the_pair_is_named() -> None:
    r, inputs = _round(3)
    cheat = r.clients["c02"]
    honest_share = cheat.share

    def share(roster: Mapping[str, Advert], graph_seed: bytes) -> tuple[bytes, dict[str, bytes]]:
        commitment, bundles = honest_share(roster, graph_seed)
        junk = [secrets.randbelow(shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big") for _ in range(2)]
        plain = msgpack.packb(junk, use_bin_type=True)
        bundles["c01"] = agreement.seal(cheat._channel("c01"), plain, bundle_aad(cheat.run_id, cheat.round_no,
                                                                                 "c02", "c01"))
        return commitment, bundles

    cheat.share = share  # type: ignore[method-assign]
    got = r.run(inputs)
    assert np.array_equal(got.total, _expected(inputs, set(r.clients)))
    # The aggregator cannot tell whether c02 dealt it or c01 altered it: the record names both.
    assert got.bad_holders == {"c02": ["c01"]}


@pytest.mark.parametrize(("tensors", "reason", "detail"), [
    ([np.zeros(13, np.float32)], "wrong_dtype", "is float32, expected uint32"),
    ([np.zeros(12, np.uint32)], "wrong_shape", "has shape [12], expected [13]"),
    ([np.zeros((13, 1), np.uint32)], "wrong_shape", "has shape [13, 1], expected [13]"),
    ([np.zeros(13, np.uint32), np.zeros(1, np.uint32)], "wrong_shape", "update has 2 tensors, the model has 1"),
])
def test_a_masked_input_of_the_wrong_size_or_type_is_refused_by_name(
        r: redis.Redis, tensors: list[np.ndarray], reason: str, detail: str) -> None:
    model = [np.zeros((4, 3), np.float32)]
    wire = wire_template(messages.template_of(["dense/kernel"], model))
    assert wire == [messages.TensorSpec(WIRE_NAME, "<u4", (13,))]
    names = [WIRE_NAME, "extra"][:len(tensors)]
    payload = messages.encode_update("sa-cheats", 1, "c0", 1, {}, names, tensors)
    with pytest.raises(UpdateRejected) as refused:
        messages.validate_update(payload, run_id="sa-cheats", round_no=1, client_id="c0", template=wire)
    assert refused.value.reason == reason and detail in str(refused.value)
    # The sum refuses it as well (a refused client is unmasked as one that dropped).
    spec = RunSpec(clients=5, rounds=1, secure_aggregation=True, run_id="sa-cheats").validate()
    acc = SecureSum(spec, model, RunStore(r, spec.run_id), tick=lambda: None)
    with pytest.raises(ValueError, match="a masked update is one uint32 vector of 13 values"):
        acc.add(tensors, 1, "c0")
    assert acc.count == 0 and not acc._sum.any()

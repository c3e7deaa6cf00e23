"""Models in parts: the pure format, folding part by part, and rounds through a real Redis."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.federation import Federation

from fedq.errors import CodecError
from fedq.learning.aggregate import FedAvg, fedavg
from fedq.protocol import chunking, codec, transfer
from fedq.protocol.signing import Signer, Verifier, new_keys
from fedq.protocol.store import RunStore
from fedq.settings import Settings

CHUNK = 1024  # the smallest chunk: the seed model (330 parameters) goes in two parts


def _model(rng: np.random.Generator, shapes=((3, 1, 4), (4,), (700, 9), (9,), (9, 2), (2,), (1,))) -> list[np.ndarray]:
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _assemble(tensors: list[np.ndarray], chunk_bytes: int) -> tuple[list[np.ndarray], chunking.Layout]:
    parts = list(chunking.encode_parts(tensors, chunk_bytes))
    layout = chunking.layout_of(tensors, chunk_bytes, [d for _, d in parts])
    writer = chunking.FlatWriter([t.shape for t in tensors], layout.dtype)
    for index, (payload, _) in enumerate(parts):
        writer.put(layout.span(index)[0], chunking.decode_part(payload, layout, index))
    return writer.tensors, layout


@pytest.mark.parametrize("chunk_bytes", [1024, 4000, 4096, 25_236, 1 << 20])
def test_parts_put_back_together_are_the_model_bit_for_bit(chunk_bytes: int) -> None:
    model = _model(np.random.default_rng(1))
    got, layout = _assemble(model, chunk_bytes)
    assert layout.count == -(-sum(t.size for t in model) // (max(chunk_bytes, 1024) // 4))
    for a, b in zip(got, model):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_folding_parts_equals_folding_whole_models() -> None:
    rng = np.random.default_rng(2)
    models = [(_model(rng), n) for n in (10, 250, 3)]
    acc = FedAvg(models[0][0])
    for tensors, n in models:
        parts = list(chunking.encode_parts(tensors, 4096))
        layout = chunking.layout_of(tensors, 4096, [d for _, d in parts])
        for index, (payload, _) in enumerate(parts):
            acc.add_part(layout.span(index)[0], chunking.decode_part(payload, layout, index), n)
        acc.count_model(n)
    for got, want in zip(acc.result(), fedavg(models)):
        np.testing.assert_array_equal(got, want)


def test_a_part_that_is_not_what_the_head_says_is_refused() -> None:
    model = _model(np.random.default_rng(3))
    parts = list(chunking.encode_parts(model, 4096))
    layout = chunking.layout_of(model, 4096, [d for _, d in parts])
    with pytest.raises(CodecError, match="digest"):
        chunking.decode_part(parts[1][0], layout, 0)  # the right bytes in the wrong place
    flipped = bytearray(parts[0][0])
    flipped[-1] ^= 1
    with pytest.raises(CodecError, match="digest"):
        chunking.decode_part(bytes(flipped), layout, 0)
    # A forged part with a matching digest in a forged head still has to be the right slice.
    other = codec.encode(chunking.KIND_PART, [np.zeros(10, np.float32)], meta={"index": 0, "offset": 0}, names=["flat"])
    forged = chunking.Layout(layout.count, layout.elements, layout.dtype, layout.part_elements,
                             (codec.digest(other), *layout.digests[1:]))
    with pytest.raises(CodecError, match="holds"):
        chunking.decode_part(other, forged, 0)


@pytest.mark.parametrize("change, message", [
    ({"count": 2}, "cannot carry"), ({"elements": 5}, "model has"), ({"dtype": "<f8"}, "the model is"),
    ({"part_elements": 0}, "positive"), ({"digests": ["ab"]}, "digests"), ({"count": True}, "positive"),
])
def test_a_head_that_does_not_fit_the_model_is_refused(change: dict, message: str) -> None:
    model = _model(np.random.default_rng(4))
    parts = list(chunking.encode_parts(model, 4096))
    meta = {**chunking.layout_of(model, 4096, [d for _, d in parts]).to_meta(), **change}
    with pytest.raises(CodecError, match=message):
        chunking.Layout.from_meta(meta, elements=sum(t.size for t in model), dtype="<f4")


def test_mixed_dtypes_travel_whole_and_small_models_too() -> None:
    assert not chunking.should_chunk([np.zeros(10_000, np.float32), np.zeros(3, np.int64)], 1024)
    assert not chunking.should_chunk([np.zeros(100, np.float32)], 1024)
    assert not chunking.should_chunk([np.zeros(10_000, np.float32)], 0)
    assert chunking.should_chunk([np.zeros(10_000, np.float32)], 1024)


def _chunked_harness(harness_factory, run_id: str,
                     **settings: object) -> tuple[Federation, list[str], list[np.ndarray]]:
    h = harness_factory(1, run_id, chunk_bytes=CHUNK, **settings)
    g_round, names, g = transfer.read_global(h.store)
    assert g_round == 0
    head = codec.decode(h.store.global_payload())
    assert head.meta["parts"]["count"] == 2 and not head.tensors  # the global model itself is in parts
    return h, names, g


def test_a_round_of_updates_in_parts_commits_their_exact_fedavg_and_cleans_up(harness_factory) -> None:
    h, names, g = _chunked_harness(harness_factory, "t-parts")
    rng = np.random.default_rng(5)
    models = {cid: ([(t + rng.normal(0, 0.1, t.shape)).astype(np.float32) for t in g], n)
              for cid, n in (("c0", 100), ("c1", 300), ("c2", 7))}
    for cid, (tensors, n) in models.items():
        pushed = h.push_parts(cid, n, names, tensors)
        assert pushed.outcome == "ok" and pushed.parts == 2
    h.wait_round(1)
    _, _, new = transfer.read_global(h.store)
    for got, want in zip(new, fedavg(list(models.values()))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert h.store.metrics()[0]["num_updates"] == 3
    h.thread.join(timeout=30)
    # Every update part went with the commit; the final global model's parts stay.
    left = {k.decode() for k in h.store.r.scan_iter(match=h.store.k.base + ":*:part:*")}
    assert left == set()


@pytest.mark.parametrize("damage", ["tampered", "missing", "oversized"])
def test_a_tampered_or_missing_part_refuses_that_update_and_the_round_goes_on(harness_factory, damage: str) -> None:
    h, names, g = _chunked_harness(harness_factory, f"t-parts-{damage}")
    rng = np.random.default_rng(6)
    good = {cid: [(t + rng.normal(0, 0.1, t.shape)).astype(np.float32) for t in g] for cid in ("c0", "c1")}
    assert h.push_parts("c0", 100, names, good["c0"]).outcome == "ok"  # folded before c2's bad one
    h.push_damaged_parts("c2", 50, names, [(t + 50).astype(np.float32) for t in g], damage)
    assert h.push_parts("c1", 300, names, good["c1"]).outcome == "ok"
    h.wait_round(1)
    _, _, new = transfer.read_global(h.store)
    for got, want in zip(new, fedavg([(good["c0"], 100), (good["c1"], 300)])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # nothing of c2 in the sum
    refused = [(x["client"], x["reason"]) for x in h.store.refused()]
    assert refused == [("c2", "bad_part")], refused
    detail = h.store.refused()[0]["detail"]
    assert {"tampered": "digest", "missing": "missing", "oversized": "bytes, at most"}[damage] in detail, detail
    assert h.store.metrics()[0]["refused"] == 1


def test_signed_updates_in_parts_verify_and_forged_heads_do_not(harness_factory, tmp_path) -> None:
    private, registry = new_keys(["c0", "c1", "c2"])
    (tmp_path / "keys.json").write_text(json.dumps(registry))
    for cid, pem in private.items():
        (tmp_path / f"{cid}.key").write_bytes(pem)
    h, names, g = _chunked_harness(harness_factory, "t-parts-signed", client_keys=str(tmp_path / "keys.json"))
    signers = {cid: Signer.from_file(tmp_path / f"{cid}.key") for cid in private}
    assert isinstance(h.agg.verifier, Verifier)
    # c2 signs with c0's key: the head verifies for nobody but c0.
    assert h.push_parts("c2", 50, names, g, signer=signers["c0"]).outcome == "ok"
    assert h.push_parts("c0", 100, names, g, signer=signers["c0"]).outcome == "ok"
    assert h.push_parts("c1", 300, names, g, signer=signers["c1"]).outcome == "ok"
    h.wait_round(1)
    assert sorted(h.store.metrics()[0]["clients"]) == ["c0", "c1"]
    assert [(x["client"], x["reason"]) for x in h.store.refused()] == [("c2", "bad_signature")]


def test_an_update_in_parts_over_the_cap_is_refused_before_it_is_sent(redis_url, r) -> None:
    from fedq.learning.spec import RunSpec

    st = RunStore(r, "t-parts-cap")
    st.create(RunSpec(clients=1, rounds=1))
    pushed = transfer.push_update(st, "c0", 1, 5, {}, ["w"], [np.zeros(4096, np.float32)], chunk_bytes=CHUNK,
                                  max_bytes=10_000)
    assert pushed.outcome == "too_large" and pushed.nbytes == 0
    assert [x["reason"] for x in st.refused()] == ["too_large"]
    assert not list(r.scan_iter(match=st.k.base + ":*:part:*"))


def test_chunk_size_setting_is_checked() -> None:
    with pytest.raises(Exception, match="chunk_bytes"):
        Settings.from_env(env={"FEDQ_CHUNK_BYTES": "100"})
    assert Settings.from_env(env={"FEDQ_CHUNK_BYTES": "0"}).chunk_bytes == 0

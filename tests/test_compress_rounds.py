"""Compressed updates through the real round protocol (Redis, in-process aggregator).

Each round c0 and c1 push valid int8 deltas and c2 pushes one kind of malformed compressed
payload: the round commits global + the FedAvg of the two reconstructed updates, the refusal is
recorded with its reason, and the round record reports the bytes on the wire and the error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from support.federation import Federation

from fedq.learning.aggregate import fedavg
from fedq.protocol import codec, compress, messages

N_GOOD = (100, 300)
BLOCK = 16  # small blocks, so that the seed network's tensors have several each


def _local(g: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(t + rng.normal(0, 0.05, t.shape)).astype(t.dtype) for t in g]


def _packed(h: Federation, cid: str, rnd: int, n: int, names: list[str], g: list[np.ndarray],
            local: list[np.ndarray], encoding: str = "int8") -> tuple[bytes, messages.Compressed]:
    packed = messages.compress_update(names, local, g, encoding, BLOCK)
    payload = messages.encode_update(h.store.run_id, rnd, cid, n, {"loss": 0.5, **packed.metrics}, packed.names,
                                     packed.tensors, None, packed.descriptor)
    return payload, packed


def _edit(payload: bytes, name: str, fn: Callable[[np.ndarray], np.ndarray | None], **meta: object) -> bytes:
    env = codec.decode(payload)
    pairs = [(n, fn(np.array(t)) if n == name else t) for n, t in zip(env.names, env.tensors)]
    pairs = [(n, t) for n, t in pairs if t is not None]
    return codec.encode("update", [t for _, t in pairs], meta={**env.meta, **meta}, names=[n for n, _ in pairs])


def _nan_first(t: np.ndarray) -> np.ndarray:
    t[0] = np.nan
    return t


def test_compressed_rounds_refuse_malformed_payloads_and_report_the_error(harness_factory) -> None:
    h = harness_factory(6, "t-int8", spec_extra={"compression": "int8"})
    _, names, _ = h.global_model()
    k0 = names[2]  # the dense kernel: 36 x 8 values, 18 blocks of 16
    cases: list[tuple[str, Callable[[bytes, list[np.ndarray], list[np.ndarray]], bytes]]] = [
        ("bad_scales", lambda p, g, w: _edit(p, k0 + "#scales", lambda s: s[:-1])),
        ("bad_scales", lambda p, g, w: _edit(p, k0 + "#scales", _nan_first)),
        ("wrong_dtype", lambda p, g, w: _edit(p, k0, lambda t: t.astype(np.float16))),
        ("bad_compression", lambda p, g, w: _edit(p, k0, lambda t: t, compression={"encoding": "int8", "block": -1})),
        ("bad_compression", lambda p, g, w: _packed(h, "c2", len(h.store.metrics()) + 1, 50, names, g, w,
                                                    "float16")[0]),
        ("", lambda p, g, w: h.update("c2", len(h.store.metrics()) + 1, 50, w, names)),  # float32: accepted
    ]
    for rnd, (reason, make) in enumerate(cases, start=1):
        g_round, _, g = h.global_model()
        assert g_round == rnd - 1
        local = [_local(g, 10 * rnd + i) for i in range(3)]
        bad_base, _ = _packed(h, "c2", rnd, 50, names, g, local[2])
        assert h.push("c2", rnd, make(bad_base, g, local[2])) == "ok"
        sent = []
        for i, cid in enumerate(("c0", "c1")):
            payload, packed = _packed(h, cid, rnd, N_GOOD[i], names, g, local[i])
            assert h.push(cid, rnd, payload) == "ok"
            sent.append((payload, packed))
        h.wait_round(rnd)

        # What the aggregator must have folded: global + each decoded delta, in float32.
        rebuilt = []
        for _, packed in sent:
            k = len(g)
            rebuilt.append([compress.decode([packed.tensors[j], packed.tensors[k + j]], "int8", BLOCK, base=g[j])
                            for j in range(k)])
        good = [(rebuilt[0], N_GOOD[0]), (rebuilt[1], N_GOOD[1])]
        if not reason:
            good.append((local[2], 50))
        _, _, new = h.global_model()
        for got, want in zip(new, fedavg(good)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

        m = h.store.metrics()[-1]
        comp = m["compression"]
        errors = [p.metrics["compression_error"] for _, p in sent]
        assert 0 < max(errors) < 0.05
        assert comp["encoding"] == "int8" and comp["compressed_updates"] == 2
        assert comp["error_max"] == max(errors) and abs(comp["error_mean"] - sum(errors) / 2) < 1e-12
        float32 = sum(t.nbytes for t in g)
        assert comp["payload_bytes"] == sum(len(p) for p, _ in sent) + (len(make(bad_base, g, local[2]))
                                                                        if not reason else 0)
        assert comp["tensor_bytes"] == sum(sum(t.nbytes for t in p.tensors) for _, p in sent) + \
            (0 if reason else float32)
        assert comp["float32_bytes"] == float32 * m["num_updates"]
        if reason:  # 330 values: 330 bytes of codes and 4 bytes per block of 16, against 1,320 bytes
            assert comp["ratio"] == comp["tensor_bytes"] / comp["float32_bytes"] < 0.5
        if reason:
            assert m["num_updates"] == 2 and m["refused"] == 1
            last = h.store.refused()[-1]
            assert (last["client"], last["round"], last["reason"]) == ("c2", rnd, reason), last
        else:
            assert m["num_updates"] == 3
    h.thread.join(timeout=30)
    assert h.store.state()["status"] == "finished"
    assert len(h.store.refused()) == len(cases) - 1


def test_signed_compressed_updates_verify_and_a_changed_block_size_does_not(harness_factory, tmp_path) -> None:
    import json

    from fedq.protocol.signing import Signer, new_keys

    private, registry = new_keys(["c0", "c1", "c2"])
    for cid, pem in private.items():
        (tmp_path / f"{cid}.key").write_bytes(pem)
    (tmp_path / "keys.json").write_text(json.dumps(registry))
    h = harness_factory(1, "t-int8-signed", spec_extra={"compression": "int8"},
                        client_keys=str(tmp_path / "keys.json"))
    _, names, g = h.global_model()
    for i, cid in enumerate(("c0", "c1", "c2")):
        packed = messages.compress_update(names, _local(g, i), g, "int8", 150)
        sig = Signer.from_file(tmp_path / f"{cid}.key").sign(h.store.run_id, 1, cid, 50, packed.names,
                                                             packed.tensors, packed.descriptor)
        payload = messages.encode_update(h.store.run_id, 1, cid, 50, packed.metrics, packed.names, packed.tensors,
                                         sig, packed.descriptor)
        if cid == "c2":
            # The dense kernel's 288 values make 2 blocks of 150 as of 200 (every other tensor one):
            # the payload stays well-formed and decodes differently, so only the signature can tell.
            env = codec.decode(payload)
            payload = codec.encode("update", env.tensors, names=env.names,
                                   meta={**env.meta, "compression": {"encoding": "int8", "block": 200}})
        assert h.push(cid, 1, payload) == "ok"
    h.wait_round(1)
    m = h.store.metrics()[0]
    assert sorted(m["clients"]) == ["c0", "c1"] and m["compression"]["compressed_updates"] == 2
    last = h.store.refused()[-1]
    assert (last["client"], last["reason"]) == ("c2", "bad_signature"), last

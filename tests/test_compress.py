"""Compressed updates without Redis: the encodings' error bounds, the wire checks, the signature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedq.errors import ConfigError, UpdateRejected
from fedq.learning.spec import RunSpec
from fedq.protocol import codec, compress, messages
from fedq.protocol.signing import Signer, Verifier, new_keys

EPS32 = float(np.finfo(np.float32).eps)
NAMES = ["000:dense/kernel", "001:dense/bias", "002:steps"]


def _model(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((70, 100)).astype(np.float32), rng.standard_normal(9).astype(np.float32),
            np.array([3, 4], np.int64)]  # a non-float tensor travels unchanged


def _trained(g: list[np.ndarray], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(g[0] + rng.normal(0, 0.01, g[0].shape)).astype(np.float32), g[1] + np.float32(0.2), g[2]]


GLOBAL = _model()
TEMPLATE = messages.template_of(NAMES, GLOBAL)


# --- the encodings ----------------------------------------------------------------------------

@pytest.mark.parametrize("size,block", [(1, 4), (7, 4), (8, 4), (4096 * 3 + 5, 4096), (2_500_001, 4096),
                                        (1000, 1)])
def test_int8_error_is_at_most_half_a_step_per_value(size: int, block: int) -> None:
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size).astype(np.float32) * np.float32(0.01)
    x[size // 2] = 3.0  # an outlier: coarsens its own block only
    codes, scales = compress.quantize_int8(x, block)
    assert codes.dtype == np.int8 and scales.dtype == np.float32
    assert scales.shape == (compress.num_blocks(size, block),)
    step = np.repeat(scales, block)[:size]
    # The scale is exactly max|x| / 127 of its block.
    padded = np.zeros(len(scales) * block, np.float32)
    padded[:size] = np.abs(x)
    np.testing.assert_array_equal(scales, padded.reshape(-1, block).max(axis=1) / np.float32(127))
    err = np.abs(compress.dequantize_int8(codes, scales, block) - x)
    # scale / 2, plus float32 rounding of x / scale and of codes * scale (|code| <= 127).
    assert (err <= step * (0.5 + 128 * EPS32)).all(), float((err / step).max())
    assert int(np.abs(codes).max()) <= 127
    if size > block:
        outlier_block = (size // 2) // block
        others = np.delete(np.arange(len(scales)), outlier_block)
        assert scales[others].max() < 0.01  # one outlier did not wreck the rest of the tensor


def test_int8_of_zeros_and_shapes() -> None:
    z = np.zeros((3, 5), np.float32)
    codes, scales = compress.quantize_int8(z, 4)
    assert codes.shape == (3, 5) and (scales == 0).all()
    assert (compress.dequantize_int8(codes, scales, 4) == 0).all()
    empty_codes, empty_scales = compress.quantize_int8(np.zeros((0, 4), np.float32))
    assert empty_codes.shape == (0, 4) and empty_scales.shape == (0,)
    base = np.ones((3, 5), np.float32)
    np.testing.assert_array_equal(compress.decode([codes, scales], "int8", 4, base=base), base)


@pytest.mark.parametrize("magnitude", [1e-7, 1e-4, 1.0, 1e6])
def test_float16_relative_error_per_value(magnitude: float) -> None:
    x = np.random.default_rng(3).standard_normal(100_000).astype(np.float32) * np.float32(magnitude)
    half, scale = compress.encode(x, "float16")
    assert half.dtype == np.float16 and scale.dtype == np.float32 and scale.shape == (1,)
    # The scale is a power of two that lifts the largest value into [2**14, 2**15).
    assert np.frexp(scale[0])[0] == 0.5 and 2 ** 14 <= np.abs(x).max() / scale[0] < 2 ** 15
    back = compress.decode([half, scale], "float16")
    assert back.dtype == np.float32
    # Deltas of 1e-7 (float16 subnormals unscaled) and 1e6 (beyond float16) keep 11 bits too.
    keep = np.abs(x) >= np.abs(x).max() * 2.0 ** -29
    assert (np.abs(back - x)[keep] <= np.abs(x)[keep] * 2.0 ** -11).all()
    assert compress.relative_error([back], [x]) < 2.0 ** -11


def test_unencodable_deltas_raise() -> None:
    for enc in ("float16", "int8"):
        with pytest.raises(compress.CompressionError, match="NaN"):
            compress.encode(np.array([0.0, np.nan], np.float32), enc)
        with pytest.raises(compress.CompressionError, match="infinity"):
            compress.encode(np.array([np.inf, 1.0], np.float32), enc)
    with pytest.raises(ValueError, match="block size"):
        compress.quantize_int8(np.zeros(3, np.float32), 0)


def test_relative_error_measures_the_reconstruction() -> None:
    x = [np.full(4, 2.0, np.float32), np.zeros(3, np.float32)]
    y = [np.full(4, 2.2, np.float32), np.zeros(3, np.float32)]
    assert compress.relative_error(y, x) == pytest.approx(0.1, rel=1e-6)
    assert compress.relative_error(x, x) == 0.0
    assert compress.relative_error([np.zeros(2)], [np.zeros(2)]) == 0.0


def test_the_spec_validates_compression() -> None:
    assert RunSpec().compression == "none"
    assert RunSpec.from_dict(RunSpec(compression="int8").to_dict()).compression == "int8"
    with pytest.raises(ConfigError, match="unknown compression 'gzip'; choose one of none, float16, int8"):
        RunSpec(compression="gzip").validate()


# --- the wire ----------------------------------------------------------------------------------

def _payload(encoding: str, weights: list[np.ndarray] | None = None, block: int = 256,
             signer: Signer | None = None) -> tuple[bytes, messages.Compressed]:
    packed = messages.compress_update(NAMES, weights or _trained(GLOBAL), GLOBAL, encoding, block)
    sig = None
    if signer is not None:
        sig = signer.sign("run", 1, "c0", 10, packed.names, packed.tensors, packed.descriptor)
    payload = messages.encode_update("run", 1, "c0", 10, {"loss": 0.1, **packed.metrics}, packed.names,
                                     packed.tensors, sig, packed.descriptor)
    return payload, packed


def _check(payload: bytes, compression: str = "int8") -> messages.Update:
    return messages.validate_update(payload, run_id="run", round_no=1, client_id="c0", template=TEMPLATE,
                                    compression=compression, base=GLOBAL)


@pytest.mark.parametrize("encoding,bound", [("float16", 1e-3), ("int8", 2e-2)])
def test_the_aggregator_reconstructs_global_plus_delta(encoding: str, bound: float) -> None:
    local = _trained(GLOBAL)
    payload, _packed = _payload(encoding, local)
    upd = _check(payload, encoding)
    assert upd.names == NAMES and [t.dtype for t in upd.tensors] == [np.float32, np.float32, np.int64]
    assert upd.encoding == encoding and upd.payload_bytes == len(payload)
    np.testing.assert_array_equal(upd.tensors[2], GLOBAL[2])
    deltas = [w - g for w, g in zip(local[:2], GLOBAL[:2])]
    got = [w - g for w, g in zip(upd.tensors[:2], GLOBAL[:2])]
    measured = compress.relative_error(got, deltas)
    assert 0 < measured < bound
    # The client's figure is the same measurement (up to float32 rounding of global + delta).
    assert upd.metrics["compression_error"] == pytest.approx(measured, rel=1e-3)
    raw = sum(t.nbytes for t in local)
    assert upd.metrics["compression_bytes_saved"] == raw - upd.metrics["compression_bytes"] > 0


def test_float32_weights_are_accepted_in_a_compressed_run_but_not_the_reverse() -> None:
    plain = messages.encode_update("run", 1, "c0", 10, {}, NAMES, _trained(GLOBAL))
    assert _check(plain, "int8").encoding == "none"
    with pytest.raises(UpdateRejected) as err:
        _check(_payload("int8")[0], "none")
    assert err.value.reason == "bad_compression" and "uncompressed float32 weights only" in err.value.detail
    with pytest.raises(UpdateRejected) as err:
        _check(_payload("float16")[0], "int8")
    assert err.value.reason == "bad_compression" and "encoded as float16" in err.value.detail


def _rewrite(payload: bytes, *, meta: dict | None = None,
             tensors: dict[str, np.ndarray | None] | None = None) -> bytes:
    """The payload with meta fields replaced and tensors replaced (None: removed)."""
    env = codec.decode(payload)
    pairs = [(n, t) for n, t in zip(env.names, env.tensors)]
    for name, new in (tensors or {}).items():
        pairs = [(n, new if n == name else t) for n, t in pairs if not (n == name and new is None)]
    return codec.encode("update", [t for _, t in pairs], meta={**env.meta, **(meta or {})},
                        names=[n for n, _ in pairs])


def _bad_payloads() -> tuple[list[tuple[str, str, str, bytes]], list[tuple[str, str, str, bytes]]]:
    """(run encoding, reason, detail, payload): malformed, and well-formed with a non-finite delta."""
    int8, _ = _payload("int8")
    f16, _ = _payload("float16")
    env = codec.decode(int8)
    scales = dict(zip(env.names, env.tensors))["000:dense/kernel#scales"]
    codes = dict(zip(env.names, env.tensors))["000:dense/kernel"]
    nan = np.array(scales)
    nan[1] = np.nan
    neg = np.array(scales)
    neg[0] = -neg[0]
    inf16 = np.array(codec.decode(f16).tensors[1])
    inf16[0] = np.inf
    k_scales = "000:dense/kernel#scales"
    return [
        ("int8", "bad_scales", "have shape [27], expected [28]", _rewrite(int8, tensors={k_scales: scales[:-1]})),
        ("int8", "bad_scales", "are float64, expected float32",
         _rewrite(int8, tensors={k_scales: scales.astype(np.float64)})),
        ("int8", "bad_scales", "contain NaN", _rewrite(int8, tensors={k_scales: nan})),
        ("int8", "bad_scales", "negative", _rewrite(int8, tensors={k_scales: neg})),
        ("int8", "wrong_shape", "expected 5 (3 tensors and 2 scales)",
         _rewrite(int8, tensors={"001:dense/bias#scales": None})),
        ("int8", "wrong_dtype", "is float16, expected int8",
         _rewrite(int8, tensors={"000:dense/kernel": codes.astype(np.float16)})),
        ("float16", "wrong_dtype", "is int8, expected float16",
         _rewrite(f16, meta={"compression": {"encoding": "float16"}},
                  tensors={"001:dense/bias": np.zeros(9, np.int8)})),
        ("int8", "wrong_shape", "has shape [7000]", _rewrite(int8, tensors={"000:dense/kernel": codes.reshape(-1)})),
        ("int8", "bad_compression", "block size",
         _rewrite(int8, meta={"compression": {"encoding": "int8", "block": 0}})),
        ("int8", "bad_compression", "block size", _rewrite(int8, meta={"compression": {"encoding": "int8"}})),
        ("int8", "bad_compression", "unknown encoding 'int4'",
         _rewrite(int8, meta={"compression": {"encoding": "int4"}})),
        ("int8", "bad_compression", "must be a map", _rewrite(int8, meta={"compression": "int8"})),
        ("int8", "bad_compression", "unknown compression field", _rewrite(
            int8, meta={"compression": {"encoding": "int8", "block": 256, "zero_point": 3}})),
        ("float16", "bad_scales", "have shape [2], expected [1] (float16: one per tensor)",
         _rewrite(f16, tensors={"001:dense/bias#scales": np.ones(2, np.float32)})),
    ], [("float16", "non_finite", "NaN or infinity", _rewrite(f16, tensors={"001:dense/bias": inf16}))]


@pytest.mark.parametrize("index", range(14))
def test_malformed_compressed_payloads_are_refused_with_a_clear_reason(index: int) -> None:
    run_encoding, reason, detail, payload = _bad_payloads()[0][index]
    with pytest.raises(UpdateRejected) as err:
        _check(payload, run_encoding)
    assert err.value.reason == reason and detail in err.value.detail, err.value


def test_non_finite_float16_deltas_are_refused() -> None:
    run_encoding, reason, detail, payload = _bad_payloads()[1][0]
    with pytest.raises(UpdateRejected) as err:
        _check(payload, run_encoding)
    assert err.value.reason == reason and detail in err.value.detail


# --- signatures --------------------------------------------------------------------------------

def test_the_signature_covers_the_compressed_tensors_and_the_encoding(tmp_path: Path) -> None:
    private, registry = new_keys(["c0"])
    (tmp_path / "c0.key").write_bytes(private["c0"])
    (tmp_path / "keys.json").write_text(json.dumps(registry))
    signer, verifier = Signer.from_file(tmp_path / "c0.key"), Verifier.from_file(tmp_path / "keys.json")
    payload, _ = _payload("int8", signer=signer)

    def verify(p: bytes) -> None:
        upd = _check(p)
        verifier.verify("run", 1, "c0", upd.num_examples, upd.wire_names, upd.wire_tensors, upd.signature,
                        upd.compression)

    verify(payload)  # no exception
    env = codec.decode(payload)
    scales = np.array(dict(zip(env.names, env.tensors))["001:dense/bias#scales"])
    scales[0] *= 2
    tampered = {
        "scales": _rewrite(payload, tensors={"001:dense/bias#scales": scales}),
        # 7,000 and 9 values make 28 and 1 blocks of 250 as of 256: every scales length stays valid,
        # yet each block boundary moves, so only the signature can tell.
        "block": _rewrite(payload, meta={"compression": {"encoding": "int8", "block": 250}}),
    }
    for what, p in tampered.items():
        with pytest.raises(UpdateRejected) as err:
            verify(p)
        assert err.value.reason == "bad_signature", what

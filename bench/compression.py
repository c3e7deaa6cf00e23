"""Compressed updates side by side in one run: bytes, time and error of float32, float16 and int8.

For each model size, one realistic update (see ``delta``) goes the way a round sends it:

- encode: the client's side, ``messages.compress_update`` (delta from the global model,
  quantisation, the error measurement it reports) and ``messages.encode_update`` (the envelope);
  for float32 only the envelope;
- decode: the aggregator's side, ``messages.validate_update`` (envelope, checks, global + delta);
- bytes: the whole payload, and its ratio to the float32 payload;
- error: ||decoded delta - delta|| / ||delta|| over the model (what the client reports), for
  Gaussian and for heavy-tailed deltas with outliers (see ``delta``).

    python bench/compression.py [--params 1000000 25000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from micro import best  # bench/ is the script's directory, so its sibling imports directly

from fedq.protocol import compress, messages


def model(params: int, seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    """A stack of dense layers (kernel and bias each) of about ``params`` float32 values."""
    rng = np.random.default_rng(seed)
    width = int((params / 4) ** 0.5)
    names, tensors = [], []
    for i in range(4):
        names += [f"{2 * i:03d}:dense/kernel", f"{2 * i + 1:03d}:dense/bias"]
        tensors += [rng.normal(0, 1 / width ** 0.5, (width, width)).astype(np.float32),
                    np.zeros(width, np.float32)]
    return names, tensors


DELTAS = ("gaussian", "heavy")


def delta(tensors: list[np.ndarray], kind: str = "heavy", seed: int = 1) -> list[np.ndarray]:
    """A plausible local-training update. Layers move by different amounts (step sizes log-uniform
    in 1e-4..1e-2) and columns by different amounts within a layer (log-normal); the values are
    Gaussian, or ("heavy") Student t with 4 degrees of freedom and one value in 10,000 an outlier
    50 times larger, as sparse large gradients give."""
    rng = np.random.default_rng(seed)
    out = []
    for t in tensors:
        step = np.float32(10 ** rng.uniform(-4, -2))
        cols = rng.lognormal(0, 0.5, t.shape[-1]).astype(np.float32)
        if kind == "gaussian":
            d = rng.standard_normal(t.shape, dtype=np.float32)
        else:
            d = rng.standard_t(4, t.shape).astype(np.float32)
            d[rng.random(t.shape) < 1e-4] *= 50
        d *= cols * step
        out.append(d)
    return out


def bench(params: int, kind: str, repeat: int, blocks: list[int]) -> list[tuple[str, int, float, float, float]]:
    """(encoding, payload bytes, encode s, decode s, relative error): float32, float16, int8 per block."""
    names, g = model(params)
    local = [a + b for a, b in zip(g, delta(g, kind))]
    template = messages.template_of(names, g)
    rows = []
    for enc, block in [("none", 0), ("float16", 0), *(("int8", b) for b in blocks)]:
        def encode(enc: str = enc, block: int = block) -> tuple[bytes, float]:  # this iteration's
            if enc == "none":
                return messages.encode_update("run", 1, "c0", 100, {}, names, local), 0.0
            packed = messages.compress_update(names, local, g, enc, block or compress.DEFAULT_BLOCK)
            return (messages.encode_update("run", 1, "c0", 100, packed.metrics, packed.names, packed.tensors,
                                           None, packed.descriptor), packed.metrics["compression_error"])

        payload, error = encode()

        def decode(payload: bytes = payload, enc: str = enc) -> None:
            messages.validate_update(payload, run_id="run", round_no=1, client_id="c0", template=template,
                                     compression=enc, base=g)

        # Interleaved, so that both sides see the same machine load.
        enc_t, dec_t = [], []
        for _ in range(repeat):
            enc_t.append(best(encode, 1, warmup=False))
            dec_t.append(best(decode, 1, warmup=False))
        label = {"none": "float32", "float16": "float16"}.get(enc, f"int8/{block}")
        rows.append((label, len(payload), statistics.median(enc_t), statistics.median(dec_t), error))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, nargs="+", default=[1_000_000, 25_000_000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--delta", nargs="+", choices=DELTAS, default=list(DELTAS), help="Kinds of update (see delta).")
    ap.add_argument("--block", type=int, nargs="+", default=[compress.DEFAULT_BLOCK],
                    help="int8 block sizes (e.g. 4096 1048576: what one scale per 1M values costs)")
    args = ap.parse_args()
    print(f"{'encoding':<13} {'params':>11} {'delta':>9} {'bytes':>12} {'ratio':>6} {'encode ms':>10} "
          f"{'decode ms':>10} {'enc+dec ms':>10} {'rel. error':>10}")
    for p in args.params:
        for kind in args.delta:
            rows = bench(p, kind, args.repeat, args.block)
            base = rows[0][1]
            for label, size, e, d, err in rows:
                print(f"{label:<13} {p:>11,} {kind:>9} {size:>12,} {size / base:>6.3f} {e * 1e3:>10.1f} "
                      f"{d * 1e3:>10.1f} {(e + d) * 1e3:>10.1f} {err:>10.2e}", flush=True)


if __name__ == "__main__":
    main()

"""Update validation rules that do not need Redis."""

from __future__ import annotations

import numpy as np
import pytest

from fedq.errors import UpdateRejected
from fedq.protocol import messages

NAMES = ["w", "b"]
TENSORS = [np.ones((3, 2), np.float32), np.zeros(2, np.float32)]
TEMPLATE = messages.template_of(NAMES, TENSORS)


def _update(**over: object) -> bytes:
    args = {"run_id": "run", "round_no": 1, "client_id": "c0", "num_examples": 10}
    args.update(over)
    return messages.encode_update(args["run_id"], args["round_no"], args["client_id"], args["num_examples"],
                                  {"loss": 0.1}, NAMES, TENSORS)


def _check(payload: bytes, **over: object) -> messages.Update:
    kw = {"run_id": "run", "round_no": 1, "client_id": "c0", "template": TEMPLATE}
    kw.update(over)
    return messages.validate_update(payload, **kw)


def test_a_valid_update_passes_with_its_digest() -> None:
    payload = _update()
    upd = _check(payload)
    assert upd.num_examples == 10 and upd.metrics == {"loss": pytest.approx(0.1)}
    assert len(upd.digest) == 64


def test_a_sample_count_above_the_joined_rows_is_refused() -> None:
    with pytest.raises(UpdateRejected) as err:
        _check(_update(num_examples=11), max_examples=10)
    assert err.value.reason == "bad_num_examples" and "joined with 10 rows" in err.value.detail
    assert _check(_update(num_examples=10), max_examples=10).num_examples == 10


@pytest.mark.parametrize("bad_round", [True, 1.0, "1"])
def test_a_round_that_only_looks_equal_is_refused(bad_round: object) -> None:
    from fedq.protocol import codec

    env = codec.decode(_update())
    payload = codec.encode("update", env.tensors, meta={**env.meta, "round": bad_round}, names=env.names)
    with pytest.raises(UpdateRejected) as err:
        _check(payload)
    assert err.value.reason == "wrong_round"

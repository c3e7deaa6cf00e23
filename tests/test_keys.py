"""The key schema: run and client ids are checked before any key is built from them."""

from __future__ import annotations

import pytest

from fedq.errors import ConfigError
from fedq.protocol import keys


@pytest.mark.parametrize("bad", ["", "c2 ", " c2", "c2\x00", "c0:c1", "{t}", "*", "c?", "c[0]", "c0\nc1",
                                 "\u00e7lient", "x" * 65, "-c"])
def test_client_ids_that_are_not_safe_key_components_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid client id"):
        keys.RunKeys("run-a").update(bad, 1)


def test_per_client_keys_share_the_run_hash_tag_and_one_prefix() -> None:
    k = keys.RunKeys("run-a")
    own = [k.joined("c-1"), k.update("c-1", 3), k.evaluation("c-1"), k.client_refused("c-1"),
           k.client_pushes("c-1"), k.alive("c-1")]
    assert all(x.startswith("fedq:{run-a}:c:c-1:") for x in own)
    assert all(k.client_of(x) == "c-1" for x in own)
    # One client's pattern never matches another's keys, even one whose id extends it.
    import fnmatch

    assert all(fnmatch.fnmatchcase(x, k.client_pattern("c-1")) for x in own)
    assert not fnmatch.fnmatchcase(k.update("c-10", 3), k.client_pattern("c-1"))
    assert not fnmatch.fnmatchcase(k.global_model, k.client_pattern("c-1"))

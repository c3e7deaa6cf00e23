"""One vocabulary for Python and Lua (fedq.protocol.vocabulary) and the scripts' contracts."""

from __future__ import annotations

import inspect
import re

import pytest
import redis

from fedq.protocol import fencing, scripts, store
from fedq.protocol.vocabulary import ENDED, Event, Join, Phase, Push, Read, Refusal, Status, lua_prelude

WORDS = {m.value for enum in (Status, Phase, Event, Join, Push, Refusal, Read) for m in enum}


def _body(source: str) -> str:
    assert source.startswith(lua_prelude()), "every script starts with the vocabulary prelude"
    return source[len(lua_prelude()):]


@pytest.mark.parametrize("name", sorted(scripts.SCRIPTS))
def test_scripts_spell_no_word_of_the_vocabulary(name: str) -> None:
    body = _body(scripts.SCRIPTS[name])
    literals = set(re.findall(r"'([^'\n]*)'", body))
    spelled = (literals & WORDS) - scripts.FIELDS
    assert not spelled, f"{name} spells {sorted(spelled)}: use the prelude's names"


@pytest.mark.parametrize("name", sorted(scripts.SCRIPTS))
def test_scripts_build_no_key_names(name: str) -> None:
    """Key names come from fedq.protocol.keys: a script never concatenates one."""
    body = _body(scripts.SCRIPTS[name])
    assert "':" not in body and "base .." not in body, name


def test_every_script_is_headed_by_its_keys_and_argv_contract() -> None:
    source = inspect.getsource(scripts)
    for name in scripts.SCRIPTS:
        head = source[:source.index(f"\n{name} = _script(")].rsplit("\n\n", 1)[-1]
        assert "# KEYS[1]" in head and "# ARGV[1]" in head and "Returns" in head, f"{name}'s contract:\n{head}"


def test_every_script_compiles_in_redis(r: redis.Redis) -> None:
    for name, source in scripts.SCRIPTS.items():
        assert r.script_load(source), name


def test_the_prelude_names_every_word_once() -> None:
    prelude = lua_prelude()
    for prefix, enum in (("STATUS", Status), ("PHASE", Phase), ("EVENT", Event), ("JOIN", Join), ("PUSH", Push),
                         ("REFUSAL", Refusal), ("READ", Read)):
        for m in enum:
            assert prelude.count(f"local {prefix}_{m.name} = '{m.value}'\n") == 1
    assert len(prelude.splitlines()) < 190, "Lua allows 200 locals per function"


def test_python_and_redis_agree_on_the_words(r: redis.Redis) -> None:
    """What the scripts write is what Python compares with: a run's life in its own words."""
    from fedq.learning.spec import RunSpec

    st = store.RunStore(r, "words")
    st.create(RunSpec(run_id="words", clients=1, rounds=1))
    assert st.state()["status"] == Status.QUEUED and st.state()["phase"] == Phase.JOIN
    assert st.join("c0", {"shard": 0}, {"count": [1]}) == Join.REQUESTED
    assert st.acquire_lease("d", 30) and st.admit("c0")
    assert st.join("c0", {"shard": 0}, {"count": [1]}) == Join.REJOINED
    assert st.open_training(b"scaler", b"global")
    assert (st.state()["status"], st.state()["phase"]) == (Status.RUNNING, Phase.TRAIN)
    assert st.push_update("c0", 2, b"x", 100) == Push.ROUND_NOT_OPEN
    assert st.push_update("c0", 1, b"x" * 200, 100) == Push.TOO_LARGE
    assert st.push_update("c0", 1, b"x", 100) == Push.OK
    assert st.commit_round(fencing.Commit(round=1, global_payload=b"g1", metrics={"round": 1}, after=Phase.DONE,
                                        final={"round": 1}))
    assert st.state()["status"] == Status.FINISHED and Status.FINISHED in ENDED
    assert st.join("c1", {"shard": 0}, {"count": [1]}) == Join.RUN_FINISHED
    events = [e["event"] for _, e in ((i, {k.decode(): v.decode() for k, v in f.items()})
                                      for i, f in r.xrange(st.k.events))]
    assert events == [Event.CREATED, Event.ADMITTED, Event.TRAINING, Event.ROUND, Event.FINISHED]

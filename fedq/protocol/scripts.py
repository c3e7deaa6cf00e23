"""The Lua steps of the round protocol: each atomic in Redis, each headed by its KEYS/ARGV contract.

Conventions:
- Key names come from fedq.protocol.keys, passed in: a script never builds one. Scripts that
  clients run declare only the client's own keys in KEYS (Redis ACLs check declared keys), and
  take the run's shared keys by name in their arguments, each checked by the client's ACL as
  it is used.
- Small arguments travel as one JSON object with named fields (ARGV[1], decoded with cjson),
  payloads as ARGV of their own: no positional soup, no mode flags. Models and updates never
  pass through a script on a round's path: a 4 MB argument or reply costs Redis several times
  the CPU of a plain SET or GET (bench/lua_payloads.py), so their bytes travel as SET or GET of
  a staged or taken key in the same MULTI as the step, which moves them with RENAME.
- Statuses, phases, events, outcomes and refusal reasons are the locals of
  fedq.protocol.vocabulary.lua_prelude(), never string literals (tests/test_vocabulary.py).
- Steps that move a run on are fenced by the driver's lease: they return -1 when the caller no
  longer holds it.
"""

from __future__ import annotations

from fedq.protocol.vocabulary import lua_prelude

# Names the scripts may spell out: fields of the hashes and streams they write, the stage of a
# refusal record, and Redis's own type names. Everything else is a vocabulary local.
FIELDS = frozenset({
    "status", "phase", "round", "rounds", "clients", "closed", "updated_at", "finished_at", "final", "reason",
    "payload", "seq", "parts", "record", "stats", "verdict", "event", "client", "digest", "outcome", "bytes",
    "detail", "time", "stage", "push", "evaluate", "none", "hash", "set", "string",
})


def _script(body: str) -> str:
    return lua_prelude() + body


# A client asks to join (run by the client, as its own ACL user).
# KEYS[1]: the client's join hash (its own key)
# ARGV[1]: JSON {client, state, members, inbox, joins} (the shared keys by name); ARGV[2]: join
#          record (JSON); ARGV[3]: feature statistics (JSON)
# The member set is the aggregator's alone: this files the request under the client's own key,
# adds the client's id to the run's waiting requests and wakes the aggregator, which admits it
# (ADMIT). Returns JOIN_REQUESTED, JOIN_REJOINED (a
# member already), JOIN_RUN_FULL (a hint: the aggregator decides), JOIN_RUN_FINISHED,
# JOIN_RUN_FAILED or JOIN_NO_SUCH_RUN.
JOIN = _script("""
local a = cjson.decode(ARGV[1])
local st = redis.call('HMGET', a.state, 'status', 'phase', 'clients')
if not st[1] then return JOIN_NO_SUCH_RUN end
if st[1] == STATUS_FINISHED then return JOIN_RUN_FINISHED end
if st[1] == STATUS_FAILED then return JOIN_RUN_FAILED end
if redis.call('SISMEMBER', a.members, a.client) == 1 then
  redis.call('HSET', KEYS[1], 'record', ARGV[2])
  if st[2] == PHASE_JOIN then
    redis.call('HSET', KEYS[1], 'stats', ARGV[3])
    redis.call('RPUSH', a.inbox, a.client)
  end
  return JOIN_REJOINED
end
if redis.call('SCARD', a.members) >= tonumber(st[3]) then return JOIN_RUN_FULL end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'stats', ARGV[3])
redis.call('HDEL', KEYS[1], 'verdict')
redis.call('SADD', a.joins, a.client)
redis.call('RPUSH', a.inbox, a.client)
return JOIN_REQUESTED
""")

# The aggregator admits a client that asked to join, and wakes it (KEYS[6]).
# KEYS[1]: state; KEYS[2]: members; KEYS[3]: the client's join hash; KEYS[4]: lease; KEYS[5]: events;
# KEYS[6]: the client's answered list
# ARGV[1]: JSON {client, driver ('' = unfenced, for tools), events_max, verdict (written when full)}
# Returns 1 (admitted, or a member already), 0 (run full: verdict written), -1 (lease lost).
ADMIT = _script("""
local a = cjson.decode(ARGV[1])
if a.driver ~= '' and redis.call('GET', KEYS[4]) ~= a.driver then return -1 end
if redis.call('SISMEMBER', KEYS[2], a.client) == 1 then return 1 end
redis.call('RPUSH', KEYS[6], a.client)  -- answered either way below, in this same step
if redis.call('SCARD', KEYS[2]) >= tonumber(redis.call('HGET', KEYS[1], 'clients') or '0') then
  redis.call('HSET', KEYS[3], 'verdict', a.verdict)
  return 0
end
redis.call('SADD', KEYS[2], a.client)
redis.call('HDEL', KEYS[3], 'verdict')
redis.call('XADD', KEYS[5], 'MAXLEN', '~', a.events_max, '*', 'event', EVENT_ADMITTED, 'client', a.client)
return 1
""")

# Wake-ups are hints that any client may push, as many and as large as it likes: the aggregator
# drains them here, so that a flood naming one client costs one small reply, and entries that
# cannot be client ids never leave Redis.
# KEYS[1]: the run's inbox
# ARGV[1]: most entries popped in one call
# Returns the distinct entries of at most 64 bytes among those popped, in order.
DRAIN = _script("""
local seen, out = {}, {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  if string.len(id) <= 64 and not seen[id] then
    seen[id] = true
    out[#out + 1] = id
  end
end
return out
""")

# The join requests waiting for the aggregator: a bounded sample of the set clients add their ids
# to (JOIN), so that an idle moment costs the same however many keys the run has. Any client may
# add anything: entries that cannot be client ids (over 64 bytes) are dropped here, and a key of
# another type reads as empty. The entries returned stay: the aggregator takes each off as it
# judges its request, so that a reply lost on the way loses no request.
# KEYS[1]: the run's waiting join requests
# ARGV[1]: most entries returned
# Returns distinct entries of at most 64 bytes, in no order.
WAITING_JOINS = _script("""
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'set' then return {} end
local out = {}
for _, id in ipairs(redis.call('SRANDMEMBER', KEYS[1], tonumber(ARGV[1]))) do
  if string.len(id) <= 64 then
    out[#out + 1] = id
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
""")

# The aggregator's read of one client's update for a round. The client owns the key, so it may
# hold any type, size and content: type and size are checked here, before anything travels,
# and a version already judged costs a few bytes. The bytes never pass through Lua (a 4 MB
# value handed to or returned by a script costs Redis several times the CPU of a GET): a new
# version's body is moved (RENAME, no copy) out of the client's reach once its type and size
# pass, to KEYS[3], which the caller GETs and then moves to KEYS[4] in the same MULTI; a version
# taken already (a rebuild re-reading what it folded) is moved from KEYS[4] to KEYS[3] the same
# way, as it was judged. Whatever else the step answers, KEYS[3] stays absent: nothing travels.
# A client at its cap of versions for the round may still have the version folded re-read (a
# rebuild of the sum): ARGV[3] names it, and any other version is refused unread in the same
# step, so that a push landing between the aggregator's look and its read cannot travel.
# KEYS[1]: the client's update hash for the round; KEYS[2]: its body (the newest version's bytes,
#          the client's key); KEYS[3]: the bytes to send; KEYS[4]: the bytes taken; KEYS[5]: the
#          round's taken sequence numbers (KEYS[3..5]: the aggregator's)
# ARGV[1]: the push sequence number already judged ('' when none); ARGV[2]: size cap in bytes;
# ARGV[3]: the only sequence number that may be read ('' when any may); ARGV[4]: the client id
# Returns {READ_NONE} | {READ_CAPPED} | {READ_WRONG_TYPE, type} | {READ_BAD_SEQ, raw} | {READ_SEEN, seq}
#       | {READ_BAD_PARTS, seq} | {READ_NO_BODY, seq} | {READ_TOO_LARGE, seq, size}
#       | {READ_OK, seq, push id} (the bytes: under KEYS[3])
READ_UPDATE = _script("""
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return {READ_NONE} end
if ARGV[3] ~= '' and (t ~= 'hash' or redis.call('HGET', KEYS[1], 'seq') ~= ARGV[3]) then return {READ_CAPPED} end
if t ~= 'hash' then return {READ_WRONG_TYPE, t} end
local seq = redis.call('HGET', KEYS[1], 'seq')
if not seq or string.len(seq) > 15 or not string.match(seq, '^%d+$') then
  return {READ_BAD_SEQ, string.sub(seq or '', 1, 32)}
end
if seq == ARGV[1] then return {READ_SEEN, seq} end
if redis.call('HSTRLEN', KEYS[1], 'parts') > 64 then return {READ_BAD_PARTS, seq} end
local parts = redis.call('HGET', KEYS[1], 'parts') or ''
if redis.call('HGET', KEYS[5], ARGV[4]) == seq and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RENAME', KEYS[4], KEYS[3])
  return {READ_OK, seq, parts}
end
if redis.call('TYPE', KEYS[2]).ok ~= 'string' then return {READ_NO_BODY, seq} end
local size = redis.call('STRLEN', KEYS[2])
if size > tonumber(ARGV[2]) then return {READ_TOO_LARGE, seq, size} end
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[5], ARGV[4], seq)
return {READ_OK, seq, parts}
""")

# How a push is refused at the door (PUSH, PUSH_EVAL): the refusal is recorded on the client's
# refused list (KEYS[2], capped at a.refused_max) with the stage it was refused at, and returned.
_REFUSED = """
local function refused(a, reason, detail, stage)
  redis.call('RPUSH', KEYS[2], cjson.encode({client=a.client, round=a.round, reason=reason, detail=detail,
                                             time=a.now, stage=stage}))
  redis.call('LTRIM', KEYS[2], -a.refused_max, -1)
  return reason
end
"""

# A client stores its update for the open round under its own key (a re-push replaces it; its
# sequence number counts versions) and wakes the aggregator; refuses, and records why, when the
# round is not the open one (run by the client, as its own ACL user). The bytes travel as a plain
# SET of the staged key in the same MULTI, before this step, which moves them (RENAME, no copy)
# to the body key or deletes them: a 4 MB argument handed to Lua costs Redis several times the
# CPU of the SET.
# KEYS[1]: the client's update hash for the round; KEYS[2]: its refused list; KEYS[3]: its pushes
# stream; KEYS[4]: its staged bytes; KEYS[5]: its update body for the round
# ARGV[1]: JSON {client, round, now, max_bytes, refused_max, pushes_max, digest, part_id,
#          window (versions an update may lag: 0 for rounds; buffered: max staleness),
#          state, members, selected, consumed, inbox}
# Returns PUSH_OK or the refusal (also recorded in KEYS[2]). The window is the client's own claim:
# the aggregator checks staleness itself; here it only saves a hopeless push its bytes.
PUSH = _script(_REFUSED + """
local a = cjson.decode(ARGV[1])
local staged = redis.call('TYPE', KEYS[4]).ok
local size = 0
if staged == 'string' then size = redis.call('STRLEN', KEYS[4]) end
local st = redis.call('HMGET', a.state, 'status', 'phase', 'round', 'closed')
if not st[1] then return PUSH_NO_SUCH_RUN end
local committed = tonumber(st[3])
local reason, detail
if st[1] ~= STATUS_RUNNING or st[2] ~= PHASE_TRAIN then
  reason = PUSH_RUN_NOT_TRAINING; detail = 'run is ' .. st[1] .. ' (' .. tostring(st[2]) .. ')'
elseif redis.call('SISMEMBER', a.members, a.client) == 0 then
  reason = PUSH_UNKNOWN_CLIENT; detail = 'client has not joined this run'
elseif a.window > 0 and a.round <= committed - a.window then
  reason = PUSH_STALE; detail = 'trained from version ' .. (a.round - 1) .. ', more than ' .. a.window ..
    ' versions behind ' .. committed
elseif a.round <= math.max(committed - a.window, tonumber(st[4] or '0')) then
  reason = PUSH_ROUND_CLOSED; detail = 'round ' .. a.round .. ' has closed'
elseif a.round > committed + 1 then
  reason = PUSH_ROUND_NOT_OPEN; detail = 'open round is ' .. (committed + 1)
elseif redis.call('HGET', a.consumed, a.client) then
  reason = PUSH_ALREADY_FOLDED; detail = 'an update trained from version ' .. (a.round - 1) ..
    ' is in a committed version already'
elseif redis.call('EXISTS', a.selected) == 1 and redis.call('SISMEMBER', a.selected, a.client) == 0 then
  reason = PUSH_NOT_SELECTED; detail = 'client is not among those chosen to train in round ' .. a.round
elseif staged ~= 'string' then
  reason = PUSH_MALFORMED; detail = 'no update staged to push (the staged key holds ' .. staged .. ')'
elseif size > a.max_bytes then
  reason = PUSH_TOO_LARGE
  detail = size .. ' bytes exceeds the cap of ' .. a.max_bytes .. ' (FEDQ_MAX_UPDATE_BYTES)'
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', a.pushes_max, '*', 'client', a.client, 'round', a.round,
           'digest', a.digest, 'outcome', reason or PUSH_OK, 'bytes', size)
if reason then
  if staged ~= 'none' then redis.call('DEL', KEYS[4]) end
  return refused(a, reason, detail, 'push')
end
redis.call('RENAME', KEYS[4], KEYS[5])
redis.call('HSET', KEYS[1], 'parts', a.part_id)
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('RPUSH', a.inbox, a.client)
return PUSH_OK
""")

# Closing a round stops further pushes for it, so that what the aggregator folded is final.
# KEYS[1]: state; KEYS[2]: lease
# ARGV[1]: the round; ARGV[2]: driver
# Returns 1 (closed), 0 (not the open round), -1 (lease lost).
CLOSE = _script("""
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'round'))
if cur + 1 ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'closed', ARGV[1])
return 1
""")

# Training opens: the scaler, the initial global model and round 1's chosen clients, at once.
# KEYS[1]: state; KEYS[2]: scaler; KEYS[3]: global model; KEYS[4]: inbox; KEYS[5]: events;
# KEYS[6]: lease; KEYS[7]: round 1's chosen clients
# ARGV[1]: JSON {driver, now, events_max, selected (ids, or null: every client trains)};
# ARGV[2]: scaler payload; ARGV[3]: initial global model payload
# Returns 1 (opened), 0 (not in its join phase), -1 (lease lost).
OPEN_TRAINING = _script("""
local a = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[6]) ~= a.driver then return -1 end
local st = redis.call('HMGET', KEYS[1], 'status', 'phase')
if (st[1] ~= STATUS_QUEUED and st[1] ~= STATUS_RUNNING) or st[2] ~= PHASE_JOIN then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
if a.selected ~= cjson.null then
  for _, id in ipairs(a.selected) do redis.call('SADD', KEYS[7], id) end
end
redis.call('HSET', KEYS[1], 'status', STATUS_RUNNING, 'phase', PHASE_TRAIN, 'round', 0, 'updated_at', a.now)
redis.call('DEL', KEYS[4])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', a.events_max, '*', 'event', EVENT_TRAINING, 'round', 0)
return 1
""")

# How a commit begins (COMMIT, COMMIT_VERSION): fenced by the lease (KEYS[6]), and only on top
# of the previous round (KEYS[1] is the state): -1 or 0 otherwise, with nothing changed (the
# caller deletes the model it staged for the commit).
_ON_TOP = """
local a = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[6]) ~= a.driver then return -1 end
local st = redis.call('HMGET', KEYS[1], 'status', 'phase', 'round')
if st[1] ~= STATUS_RUNNING or st[2] ~= PHASE_TRAIN then return 0 end
if tonumber(st[3]) + 1 ~= a.round then return 0 end
"""

# How a commit ends (COMMIT, COMMIT_VERSION): the event, then the phase after it (a.after). KEYS[1]
# is the state, KEYS[5] the events; a.round, a.now, a.final and a.events_max as the commit's.
_COMMITTED = """
redis.call('XADD', KEYS[5], 'MAXLEN', '~', a.events_max, '*', 'event', EVENT_ROUND, 'round', a.round)
if a.after == PHASE_DONE then
  redis.call('HSET', KEYS[1], 'status', STATUS_FINISHED, 'phase', PHASE_DONE, 'finished_at', a.now, 'final', a.final)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', a.events_max, '*', 'event', EVENT_FINISHED, 'round', a.round)
elseif a.after == PHASE_EVAL then
  redis.call('HSET', KEYS[1], 'phase', PHASE_EVAL)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', a.events_max, '*', 'event', EVENT_EVALUATE, 'round', a.round)
end
return 1"""

# The round commit: global model, round counter and metrics in one atomic step. It applies only
# on top of the previous round, so a replayed or duplicated commit changes nothing. The model's
# bytes are SET under KEYS[11] in the same MULTI, before this step, which moves them (RENAME, no
# copy) into place: a model handed to Lua as an argument costs Redis several times the CPU.
# KEYS[1]: state; KEYS[2]: global model; KEYS[3]: metrics; KEYS[4]: inbox; KEYS[5]: events;
# KEYS[6]: lease; KEYS[7]: server state; KEYS[8]: this round's chosen clients; KEYS[9]: the next
# round's; KEYS[10]: the model file; KEYS[11]: the staged global model (moved to KEYS[2]);
# KEYS[12 .. 11 + a.updates]: the round's update keys (hashes, bodies, taken copies and their
# sequence numbers) and parts, deleted unless a.keep_updates; the rest: stale global-model parts
# (always deleted)
# ARGV[1]: JSON {round, driver, now, events_max, keep_updates, updates, after (the phase after
#          the commit: PHASE_TRAIN, PHASE_EVAL or PHASE_DONE), final (the run's final record as
#          JSON text, with PHASE_DONE), next_selected (ids or null), previous_metrics (the
#          previous round's record with its federated evaluation, as JSON text, or '')};
#          ARGV[2]: this round's record (JSON); ARGV[3]: server optimiser state payload ('' when
#          none); ARGV[4]: the final model as a .keras file ('' when none)
# Returns 1 (committed), 0 (not on top of the previous round: nothing changed), -1 (lease lost).
COMMIT = _script(_ON_TOP + """redis.call('RENAME', KEYS[11], KEYS[2])
redis.call('HSET', KEYS[1], 'round', a.round, 'updated_at', a.now)
if a.previous_metrics ~= '' and redis.call('LLEN', KEYS[3]) > 0 then
  redis.call('LSET', KEYS[3], -1, a.previous_metrics)
end
redis.call('RPUSH', KEYS[3], ARGV[2])
local last_update = 11 + a.updates
if not a.keep_updates then
  redis.call('DEL', KEYS[8])
  for i = 12, last_update do redis.call('DEL', KEYS[i]) end
end
for i = last_update + 1, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[4])
-- Server optimiser state moves with the global model: a new driver resumes the two together.
if ARGV[3] ~= '' then redis.call('SET', KEYS[7], ARGV[3]) end
-- The model file comes with the commit that ends training: present once the run is finished.
if ARGV[4] ~= '' then redis.call('SET', KEYS[10], ARGV[4]) end
if a.next_selected ~= cjson.null then
  for _, id in ipairs(a.next_selected) do redis.call('SADD', KEYS[9], id) end
end
""" + _COMMITTED)

# A buffered version's commit (FedBuff): the next model, its copy for updates still training
# from it, the version counter and record, and which updates it folded, in one atomic step that
# applies only on top of the previous version (a replay changes nothing). The model's bytes are
# SET under KEYS[10] in the same MULTI and moved into place here (as COMMIT's).
# KEYS[1]: state; KEYS[2]: global model; KEYS[3]: metrics; KEYS[4]: inbox; KEYS[5]: events;
# KEYS[6]: lease; KEYS[7]: server state; KEYS[8]: the new version's model copy; KEYS[9]: the model
# file; KEYS[10]: the staged model; then, per folded update i (1-based), five keys from
# KEYS[6 + 5i]: its update hash, its round's consumed hash, its body, its taken copy and its
# round's taken sequence numbers; the rest: keys to delete (model copies and consumed hashes out
# of the window)
# ARGV[1]: JSON {round (the new version), driver, now, events_max, keep_updates, folded: [[client,
#          seq], ...] in KEYS order, after (PHASE_TRAIN, PHASE_EVAL or PHASE_DONE), final (JSON
#          text, with PHASE_DONE)}; ARGV[2]: the version's record (JSON); ARGV[3]: server optimiser
#          state payload ('' when none); ARGV[4]: the final model as a .keras file ('' when none:
#          only the last version's commit carries one)
# Each folded update is marked consumed (client -> the sequence number folded) and deleted unless
# the client pushed again meanwhile: that newer push stays, for the aggregator to refuse.
# Returns 1 (committed), 0 (not on top of the previous version), -1 (lease lost).
COMMIT_VERSION = _script(_ON_TOP + """redis.call('RENAME', KEYS[10], KEYS[2])
redis.call('COPY', KEYS[2], KEYS[8], 'REPLACE')
redis.call('HSET', KEYS[1], 'round', a.round, 'updated_at', a.now)
redis.call('RPUSH', KEYS[3], ARGV[2])
for i, f in ipairs(a.folded) do
  local at = 5 + 5 * i
  local upd, seqs = KEYS[at + 1], KEYS[at + 5]
  redis.call('HSET', KEYS[at + 2], f[1], f[2])
  if not a.keep_updates then
    if redis.call('TYPE', upd).ok == 'hash' and redis.call('HGET', upd, 'seq') == f[2] then
      redis.call('DEL', upd, KEYS[at + 3])
    end
    if redis.call('HGET', seqs, f[1]) == f[2] then
      redis.call('DEL', KEYS[at + 4])
      redis.call('HDEL', seqs, f[1])
    end
  end
end
for i = 11 + 5 * #a.folded, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[4])
if ARGV[3] ~= '' then redis.call('SET', KEYS[7], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('SET', KEYS[9], ARGV[4]) end
""" + _COMMITTED)

# Lease renewal: only the holder extends it (a paused or partitioned former driver cannot).
# KEYS[1]: lease
# ARGV[1]: driver; ARGV[2]: milliseconds
# Returns 1 (renewed) or 0 (not the holder).
RENEW = _script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")

# Lease release: only the holder deletes it, and says so on the events (a standby takes over).
# KEYS[1]: lease; KEYS[2]: events
# ARGV[1]: driver; ARGV[2]: events cap
# Returns 1 (released) or 0 (not the holder).
RELEASE = _script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', EVENT_RELEASED)
  return 1
end
return 0
""")

# A run fails with its reason.
# KEYS[1]: state; KEYS[2]: lease; KEYS[3]: events
# ARGV[1]: JSON {reason, now, events_max, driver ('' = unfenced: fedq run, tools, tests)}
# Returns 1 (failed) or -1 (lease lost).
FAIL = _script("""
local a = cjson.decode(ARGV[1])
if a.driver ~= '' and redis.call('GET', KEYS[2]) ~= a.driver then return -1 end
redis.call('HSET', KEYS[1], 'status', STATUS_FAILED, 'phase', PHASE_DONE, 'reason', a.reason,
           'finished_at', a.now, 'updated_at', a.now)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', a.events_max, '*', 'event', EVENT_FAILED, 'reason', a.reason)
return 1
""")

# Final evaluation: after the last commit, a client stores its evaluation of the last global
# model under its own key (a re-push replaces it) and wakes the aggregator (run by the client).
# KEYS[1]: the client's evaluation key; KEYS[2]: its refused list
# ARGV[1]: JSON {client, round (the last committed), now, max_bytes, refused_max, state,
#          members, selected (the evaluating clients' set), inbox}; ARGV[2]: the payload
# Returns PUSH_OK or the refusal (also recorded in KEYS[2]).
PUSH_EVAL = _script(_REFUSED + """
local a = cjson.decode(ARGV[1])
local payload = ARGV[2]
local st = redis.call('HMGET', a.state, 'status', 'phase', 'round')
if not st[1] then return PUSH_NO_SUCH_RUN end
local reason, detail
if st[1] ~= STATUS_RUNNING or st[2] ~= PHASE_EVAL then
  reason = PUSH_RUN_NOT_EVALUATING; detail = 'run is ' .. st[1] .. ' (' .. tostring(st[2]) .. ')'
elseif tonumber(st[3]) ~= a.round then
  reason = PUSH_WRONG_ROUND; detail = 'the last committed round is ' .. tostring(st[3])
elseif redis.call('SISMEMBER', a.members, a.client) == 0 then
  reason = PUSH_UNKNOWN_CLIENT; detail = 'client has not joined this run'
elseif redis.call('EXISTS', a.selected) == 1 and redis.call('SISMEMBER', a.selected, a.client) == 0 then
  reason = PUSH_NOT_SELECTED; detail = 'client is not among those chosen to evaluate'
elseif string.len(payload) > a.max_bytes then
  reason = PUSH_TOO_LARGE
  detail = string.len(payload) .. ' bytes exceeds the cap of ' .. a.max_bytes .. ' (FEDQ_MAX_UPDATE_BYTES)'
end
if reason then return refused(a, reason, detail, 'evaluate') end
redis.call('SET', KEYS[1], payload)
redis.call('RPUSH', a.inbox, a.client)
return PUSH_OK
""")

# Ends the final-evaluation phase and the run: the last round's record gains its federated
# evaluation.
# KEYS[1]: state; KEYS[2]: metrics; KEYS[3]: inbox; KEYS[4]: events; KEYS[5]: lease; KEYS[6]: the
# evaluating clients' set; KEYS[7..]: the clients' evaluation keys (deleted)
# ARGV[1]: JSON {round, now, events_max, driver, final (JSON text), last_metrics (JSON text, or '')}
# Returns 1 (finished), 0 (not evaluating that round), -1 (lease lost).
FINISH_EVAL = _script("""
local a = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[5]) ~= a.driver then return -1 end
local st = redis.call('HMGET', KEYS[1], 'status', 'phase', 'round')
if st[1] ~= STATUS_RUNNING or st[2] ~= PHASE_EVAL or tonumber(st[3]) ~= a.round then return 0 end
if a.last_metrics ~= '' and redis.call('LLEN', KEYS[2]) > 0 then
  redis.call('LSET', KEYS[2], -1, a.last_metrics)
end
redis.call('HSET', KEYS[1], 'status', STATUS_FINISHED, 'phase', PHASE_DONE, 'finished_at', a.now,
           'updated_at', a.now, 'final', a.final)
redis.call('DEL', KEYS[3], KEYS[6])
for i = 7, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', a.events_max, '*', 'event', EVENT_FINISHED, 'round', a.round)
return 1
""")

SCRIPTS = {"JOIN": JOIN, "ADMIT": ADMIT, "DRAIN": DRAIN, "WAITING_JOINS": WAITING_JOINS, "READ_UPDATE": READ_UPDATE,
           "PUSH": PUSH, "CLOSE": CLOSE, "OPEN_TRAINING": OPEN_TRAINING, "COMMIT": COMMIT,
           "COMMIT_VERSION": COMMIT_VERSION, "RENEW": RENEW, "RELEASE": RELEASE, "FAIL": FAIL,
           "PUSH_EVAL": PUSH_EVAL, "FINISH_EVAL": FINISH_EVAL}

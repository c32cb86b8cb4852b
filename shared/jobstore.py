"""A job's record in Redis and every step of its life, each one atomic (a Lua script).

The record (`record_key`) holds who owns the job, its payload, the current attempt and how it
ended; the job's events live in its stream (`events_key`). Steps:

    create   API      record + arq entry of attempt 1 + the worker chosen to run it woken
                      (+ idempotency key); with no free slot, or older jobs waiting, the job
                      joins the line (`WAITING`) instead, which each freed slot serves in order
    claim    worker   arq's claim, and the attempt is still current and not ended: take its lease
                      (or `create` claimed it for the worker it chose, and pushed it there: `wake`)
    decline  worker   give back a pushed attempt it will not run (it is stopping)
    append   worker   events of the current attempt only; a terminal one ends the job, and with
                      it the attempt (off arq's queue and its worker's load, whose freed slot
                      takes the line's first job) and the job's outcome in the shared totals
                      (shared/stats.py)
    renew    worker   extend the lease (and the caller's job slot); learn of a cancel or of
                      being superseded
    stop     API      cancel (or withdraw after a queue timeout): ends a job that has not
                      started at once, else flags it and tells its worker
    recover  any worker   a lease ran out: retry a job that produced nothing, else fail it

Fencing by attempt is what keeps attempts from interleaving: once a job has moved on (retried,
cancelled, failed), the old attempt's writes are refused. Every step that ends a job also frees
the caller's concurrent-job slot and its session's lock, so no path can leak either, and drops
its payload, so what stays for `EVENT_TTL_S` is the record's few fields and the events.
"""

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import apikeys, sessions, stats
from shared.jobs import CompletionJob, Failed, FailureCode, JobStatus, decode_event, encode_event
from shared.keys import (
    LOAD_FIELDS,
    PREFIX,
    QUEUE_DEADLINES,
    RUNNING,
    SWEPT,
    WAITING,
    WORKER_LOAD,
    Channels,
    attempt_id,
    events_key,
    idempotency_key,
    is_job_id,
    record_key,
    response_key,
)
from shared.queue import RUN_COMPLETION, serialize
from shared.quotas import STORED_FUNCTIONS, StorageLimit, StoredLimit, slots_key
from shared.sessions import RESTART_CLOCK

log = logging.getLogger("gateway.jobs")

PUSH_LIMIT_BYTES = 64 * 1024
"""The largest payload pushed with its job: a burst of them must stay far inside what Redis lets
a subscriber's output buffer hold (client-output-buffer-limit pubsub, 8 MiB by default). A larger
job's worker is woken to claim it."""


def _prelude(channels: Channels, failures_kept: int, push_lease_ms: int | None, ttl_s: int) -> str:
    """Names every script may use (the channels are those of the store's database)."""
    return f"""
local FAILURES_KEPT, PUSH_LEASE_MS, TTL_S = {failures_kept}, {push_lease_ms or 0}, {ttl_s}
local ARQ_JOB, ARQ_IN_PROGRESS = '{job_key_prefix}', '{in_progress_key_prefix}'
local ARQ_RETRY, RUN_COMPLETION = '{retry_key_prefix}', '{RUN_COMPLETION}'
local WAKEUP_CHANNEL, CANCEL_CHANNEL = '{channels.wakeup}', '{channels.cancel}'
local WORKER, WORKER_LOAD, RUNNING, WAITING = '{PREFIX}:worker:', '{WORKER_LOAD}', '{RUNNING}', '{WAITING}'
local QUEUE_DEADLINES, RESPONSE = '{QUEUE_DEADLINES}', '{PREFIX}:response:'  -- `response_key`
local REVOKED = '{apikeys.REVOKED}'
local LOAD_FIELDS = {{{", ".join(repr(field) for field in LOAD_FIELDS)}}}
local PUSH_LIMIT = {PUSH_LIMIT_BYTES}
-- Redis's clock, in ms: leases are timed by it, not by the callers' (a command held up in an
-- outage arrives with a time long past).
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
{STORED_FUNCTIONS}
{RESTART_CLOCK}
-- The job's record (`record_key`).
local function job_record(job_id)
  return '{PREFIX}:job:' .. job_id
end
-- Names which holder's set of job slots (shared/quotas.py) the job is in.
local function slot_record(job_id)
  return job_record(job_id) .. ':slot'
end
-- Keeps a living job's slot for its full lease from now (the lease it was taken with, kept in
-- the record), so a long or retried job never outlives its slot; a freed slot stays freed.
local function renew_slot(job_id, record)
  local lease = redis.call('hget', record, 'slot_lease')
  local slot = slot_record(job_id)
  local holder = redis.call('get', slot)
  if not lease or not holder then return end
  redis.call('zadd', holder, 'XX', 'GT', server_ms() + lease, job_id)
  if redis.call('pttl', holder) < tonumber(lease) then redis.call('pexpire', holder, lease) end
  redis.call('pexpire', slot, lease)
end
-- Frees what an ending job holds: the caller's concurrent-job slot, its session's lock, if the
-- job still holds it (a completed turn has already committed and freed it; else the session's
-- clock restarts), and its payload (the whole request, images included: nothing reads it once
-- the job has ended).
local function release_holds(job_id)
  redis.call('hdel', job_record(job_id), 'payload')
  local slot = slot_record(job_id)
  local holder = redis.call('get', slot)
  if holder then
    redis.call('zrem', holder, job_id)
    redis.call('del', slot)
  end
  local lock = redis.call('hget', job_record(job_id), 'session_lock')
  if lock and redis.call('get', lock) == job_id then
    redis.call('del', lock)
    restart_clock(redis.call('hget', job_record(job_id), 'session_clock'))
  end
end
-- Takes attempt `id` of a job for `worker`: arq's in-progress mark, the worker in the record, the
-- lease (`lease` ms from now), and the worker's load (the claim, or `push_to` in the worker's name;
-- `decline` undoes it).
local function take(record, job_id, id, worker, in_progress_ms, lease, ttl)
  redis.call('psetex', ARQ_IN_PROGRESS .. id, in_progress_ms, '1')
  redis.call('hset', record, 'worker', worker)
  -- Outlives the attempt (a job running longer than EVENT_TTL_S lost its record: a re-check probe)
  redis.call('expire', record, ttl + math.ceil(in_progress_ms / 1000), 'GT')
  redis.call('zadd', RUNNING, server_ms() + lease, job_id)
  redis.call('hincrby', WORKER_LOAD, worker, 1)
  redis.call('zrem', WAITING, id)
  redis.call('zrem', QUEUE_DEADLINES, job_id)
end
-- Takes an attempt off the count of those `worker` was chosen to run (a worker already forgotten
-- keeps no count).
local function unroute(worker)
  if redis.call('hexists', WORKER_LOAD, worker .. ':routed') == 1 then
    redis.call('hincrby', WORKER_LOAD, worker .. ':routed', -1)
  end
end
-- Hands a queued attempt to `worker`, taken in its name, with its payload on
-- `Channels.worker_push`: the worker starts it without a round trip of its own. Only a payload up
-- to `push.limit` bytes, and only to a worker listening there; false if not pushed.
local function push_to(worker, record, job_id, attempt, push)
  local payload = redis.call('hget', record, 'payload')
  if not payload or #payload > push.limit then return false end
  local id = job_id .. '.' .. attempt
  local message = id .. ' ' .. push.score .. ' ' .. payload
  if redis.call('publish', WAKEUP_CHANNEL .. ':' .. worker .. ':jobs', message) == 0 then return false end
  take(record, job_id, id, worker, push.ttl * 1000, push.lease, push.ttl)
  return true
end
-- The least loaded live worker with a free slot (ties broken by `job_id`, so a burst spreads), or
-- nil. Workers whose heartbeat expired are forgotten on the way.
local function free_worker(job_id)
  local fields = redis.call('hgetall', WORKER_LOAD)
  local load = {{}}
  for i = 1, #fields, 2 do load[fields[i]] = tonumber(fields[i + 1]) end
  local least, ties = nil, {{}}
  for worker, running in pairs(load) do
    if not string.find(worker, ':', 1, true) then
      local jobs = running + (load[worker .. ':routed'] or 0)
      if redis.call('exists', WORKER .. worker) == 0 then
        for _, field in ipairs(LOAD_FIELDS) do redis.call('hdel', WORKER_LOAD, worker .. field) end
      elseif jobs < (load[worker .. ':slots'] or 0) then
        if not least or jobs < least then
          least, ties = jobs, {{worker}}
        elseif jobs == least then
          ties[#ties + 1] = worker
        end
      end
    end
  end
  if not least then return nil end
  table.sort(ties)
  return ties[tonumber(string.sub(job_id, 1, 7), 16) % #ties + 1]
end
-- Gives queued attempt `id` to `worker`: pushed (`push_to`, given `push`), or else told on the
-- worker's own channel (`Channels.worker_wakeup`), so one claim starts it. A told worker's attempt
-- counts in its `<id>:routed` at once, so the next job sees it, until a claim or a stop takes it
-- off (the job's `routed` says whose; shared/heartbeats.py corrects drift). False if the worker
-- does not listen on its channel (a version before it, or gone).
local function place(worker, record, job_id, attempt, push)
  if push and push_to(worker, record, job_id, attempt, push) then return true end
  local told = redis.call('publish', WAKEUP_CHANNEL .. ':' .. worker, job_id .. '.' .. attempt)
  if told == 0 then return false end
  redis.call('hincrby', WORKER_LOAD, worker .. ':routed', 1)
  redis.call('hset', record, 'routed', worker)
  return true
end
-- Where an attempt queued at `ms` goes in the line: after those queued before it, in the same
-- millisecond too (a tie would order them by id).
local function line_score(ms)
  return ms + (redis.call('incr', WAITING .. ':seq') % 1000) / 1000
end
-- The oldest attempt in the line (`WAITING`) still waiting for a worker, and when it was queued;
-- entries for attempts since taken, withdrawn or ended are dropped on the way.
local function first_waiting()
  while true do
    local head = redis.call('zrange', WAITING, 0, 0, 'WITHSCORES')
    if not head[1] then return nil end
    local job_id = string.match(head[1], '^[^.]+')
    if redis.call('exists', ARQ_JOB .. head[1]) == 1 and redis.call('exists', ARQ_IN_PROGRESS .. head[1]) == 0
        and redis.call('hexists', job_record(job_id), 'worker') == 0 then
      return head[1], head[2]
    end
    redis.call('zrem', WAITING, head[1])
  end
end
-- Wakes a worker for a queued attempt (queued at `score`; `retried`: its job's first attempt was,
-- ahead of the jobs queued in that millisecond after it): the job store places jobs. With a
-- free slot and nobody waiting, the least loaded live worker gets it (`place`). Otherwise it joins
-- the line, which freed slots serve oldest first (`serve_line`), and every worker is told of the
-- line's first attempt, so a slot this store does not know of (a worker version before it) takes
-- that one, never one behind it.
local function wake(record, job_id, attempt, score, push, retried)
  local id = job_id .. '.' .. attempt
  if not first_waiting() then
    local chosen = free_worker(job_id)
    if chosen and place(chosen, record, job_id, attempt, push) then return end
  end
  redis.call('zadd', WAITING, retried and score or line_score(score), id)
  redis.call('publish', WAKEUP_CHANNEL, (first_waiting()))
end
-- A slot of `worker` has just freed: the line's first attempt, if any, goes to it.
local function serve_line(worker)
  local head, score = first_waiting()
  if not head then return end
  local job_id, attempt = string.match(head, '^([^.]+)%.(%d+)$')
  local queued = math.floor(tonumber(score))  -- its place in line, less the tie-break
  local push = PUSH_LEASE_MS > 0
    and {{score = queued, lease = PUSH_LEASE_MS, ttl = TTL_S, limit = PUSH_LIMIT}}
  if place(worker, job_record(job_id), job_id, attempt, push) then redis.call('zrem', WAITING, head) end
end
-- Counts an ended job's events in the ledger of what its holder keeps (shared/quotas.py): they,
-- its record and its stored Responses request, if any, expire `ttl` from now (the request's own
-- expiry let it outlive the record, by which it is read and deleted, by up to 11 minutes).
local function charge_events(ledger, stream, job_id, ttl)
  redis.call('expire', RESPONSE .. job_id, ttl)
  if not ledger or ledger == '' then return end
  local now, bytes = server_ms(), redis.call('memory', 'usage', stream, 'SAMPLES', '0') or 0
  stored_count(ledger, job_id, bytes, now + ttl * 1000, now, false)
end
-- Takes an attempt that ran off arq's queue (arq's `finish_job`) and off its worker's load.
-- The slot it frees serves the line.
local function finish_attempt(queue, attempt, worker)
  redis.call('zrem', queue, attempt)
  redis.call('del', ARQ_IN_PROGRESS .. attempt, ARQ_RETRY .. attempt, ARQ_JOB .. attempt)
  redis.call('hincrby', WORKER_LOAD, worker, -1)
  serve_line(worker)
end
"""


# Appends `event` after the stream's last entry, marks the job ended and counts it in the
# totals; used by `stop` and `recover`, which end jobs no worker will write to any more.
_END = (
    stats.ADD_ENDED
    + """
local function last_seq(stream)
  local tail = redis.call('xrevrange', stream, '+', '-', 'COUNT', 1)
  if tail[1] then return tonumber(string.match(tail[1][1], '%d+$')) end
  return 0
end
local function finish(record, stream, job_id, event, outcome, ttl)
  redis.call('xadd', stream, '0-' .. (last_seq(stream) + 1), 'e', event)
  redis.call('hset', record, 'ended', outcome)
  redis.call('expire', stream, ttl)
  redis.call('expire', record, ttl)
  redis.call('zrem', KEYS[3], job_id)
  release_holds(job_id)
  charge_events(redis.call('hget', record, 'ledger'), stream, job_id, ttl)
  add_ended(record, job_id, event, outcome, FAILURES_KEPT)
end
"""
)

# KEYS: record, queue, arq entry of attempt 1, [idempotency key]
# ARGV: owner, model, request_id, created, payload, arq entry, score, arq ttl ms, ttl, job id,
#       idempotency value, its session's clock or '' (`sessions.clock`), job slots key or '',
#       slot cap, slot lease ms, the worker offered the job first or '' (workspace affinity),
#       until when (ms), how long it may wait for a worker (ms; 0: as long as it takes), the
#       ledger of what the caller keeps or '', its limit (bytes), the ids of the request's other
#       choices, whose slots are taken with this job's (n > 1)
# The job's slot (shared/quotas.py) is taken here, so a job holds one exactly when it exists; a
# request's first choice takes the others' too, so the request gets all or none (a choice never
# created leaves its slot when the slot's lease runs out).
# A job offered to the worker holding its session's workspace wakes every worker: the others
# leave it to that one until the offer runs out (see the claim), then any takes it. Only while a
# slot is free and nobody waits: else it joins the line as any job does. Offered, it is the line's
# first meanwhile, so a later job cannot take the free slot and leave it behind (re-check probes
# saw session turns wait behind hundreds of later jobs until their queue timeout).
_CREATE = """
if redis.call('exists', REVOKED .. ARGV[1]) == 1 then return redis.error_reply('KEY_REVOKED') end
local existing = #KEYS == 4 and redis.call('get', KEYS[4])
if existing then return existing end
local now = ARGV[13] ~= '' and server_ms()
local taken = now and redis.call('zcount', ARGV[13], '(' .. now, '+inf')
if now and not redis.call('zscore', ARGV[13], ARGV[10]) and taken + #ARGV - 20 >= tonumber(ARGV[14]) then
  return redis.error_reply('NO_SLOT every job slot of the caller is taken')
end
local wait = ARGV[19] ~= '' and stored_wait(ARGV[19], now or server_ms(), 0, tonumber(ARGV[20]))
if wait then return redis.error_reply('STORAGE_LIMIT ' .. wait) end
-- The first write is one a full Redis refuses (`maxmemory`, `noeviction`): after any other, it
-- would let the rest of the script through and queue a job whose output has no room.
redis.call('hset', KEYS[1], 'owner', ARGV[1], 'model', ARGV[2], 'request_id', ARGV[3],
  'created', ARGV[4], 'payload', ARGV[5], 'attempt', '1', 'queue_timeout', ARGV[18], 'ledger', ARGV[19])
if now then
  redis.call('zremrangebyscore', ARGV[13], '-inf', now)
  redis.call('zadd', ARGV[13], now + ARGV[15], ARGV[10])
  for i = 21, #ARGV do redis.call('zadd', ARGV[13], now + ARGV[15], ARGV[i]) end
  redis.call('pexpire', ARGV[13], ARGV[15])
  redis.call('set', slot_record(ARGV[10]), ARGV[13], 'PX', ARGV[15])
  redis.call('hset', KEYS[1], 'slot_lease', ARGV[15])
end
if #KEYS == 4 then redis.call('set', KEYS[4], ARGV[11], 'EX', ARGV[9]) end
if ARGV[12] ~= '' then
  redis.call('hset', KEYS[1], 'session_lock', cjson.decode(ARGV[12]).lock, 'session_clock', ARGV[12])
end
redis.call('expire', KEYS[1], ARGV[9])
redis.call('psetex', KEYS[3], ARGV[8], ARGV[6])
redis.call('zadd', KEYS[2], ARGV[7], ARGV[10] .. '.1')
if ARGV[18] ~= '0' then redis.call('zadd', QUEUE_DEADLINES, ARGV[7] + ARGV[18], ARGV[10]) end
if ARGV[16] ~= '' and not first_waiting() and free_worker(ARGV[10]) then
  redis.call('hset', KEYS[1], 'prefer', ARGV[16], 'prefer_until', ARGV[17])
  redis.call('zadd', WAITING, line_score(ARGV[7]), ARGV[10] .. '.1')  -- first in line meanwhile
  redis.call('publish', WAKEUP_CHANNEL, ARGV[10] .. '.1')
else
  local push = PUSH_LEASE_MS > 0 and {score = ARGV[7], lease = PUSH_LEASE_MS, ttl = TTL_S, limit = PUSH_LIMIT}
  wake(KEYS[1], ARGV[10], 1, ARGV[7], push)
end
return false
"""

# arq's claim (the attempt is queued and due, nobody holds it: mark it in progress) and the start
# of the attempt (still current: take its lease) in one round trip, instead of arq's WATCH,
# EXISTS, ZSCORE, MULTI/EXEC and a second step of ours. A stale attempt is taken off the queue.
# A job offered first to a live worker (the one holding its session's workspace) is left to it
# until `prefer_until`: another worker gets {'defer', ms left}. The attempt moves into this
# worker's load (out of the `routed` count of the worker chosen for it, if any: see `wake`),
# unless that load fills the worker's slots ({'full'}): the job store may have pushed it a job
# for the slot it counted free, and a claim must not take it too (a re-check probe saw a worker
# of one slot run two jobs at once).
# KEYS: record, queue
# ARGV: job id, attempt, now ms, in-progress ms, worker id, lease ms, ttl
# Returns nil (not ours to start), {'taken'} (by a worker, for good), {'stale'}, {'defer', ms},
# {'full'} or {'ok', score, payload, the canceller's event or ''}.
_CLAIM = """
local attempt_id = ARGV[1] .. '.' .. ARGV[2]
if redis.call('exists', ARQ_IN_PROGRESS .. attempt_id) == 1 then return {'taken'} end
local score = redis.call('zscore', KEYS[2], attempt_id)
if not score or tonumber(score) > tonumber(ARGV[3]) then return false end
local rec = redis.call('hmget', KEYS[1], 'attempt', 'ended', 'cancel', 'payload', 'prefer', 'prefer_until',
  'routed', 'worker')
if rec[1] ~= ARGV[2] or rec[2] then
  redis.call('zrem', KEYS[2], attempt_id)
  redis.call('zrem', WAITING, attempt_id)
  redis.call('del', ARQ_JOB .. attempt_id)
  return {'stale'}
end
if rec[8] then return {'taken'} end  -- pushed to a worker (its in-progress mark may have run out)
if rec[5] and rec[5] ~= ARGV[5] and tonumber(rec[6]) > tonumber(ARGV[3])
    and redis.call('exists', WORKER .. rec[5]) == 1 then
  return {'defer', tonumber(rec[6]) - tonumber(ARGV[3])}
end
local load = redis.call('hmget', WORKER_LOAD, ARGV[5], ARGV[5] .. ':routed', ARGV[5] .. ':slots')
local busy = tonumber(load[1] or 0) + tonumber(load[2] or 0) - (rec[7] == ARGV[5] and 1 or 0)
if tonumber(load[3] or 0) > 0 and busy >= tonumber(load[3]) then return {'full'} end
take(KEYS[1], ARGV[1], attempt_id, ARGV[5], ARGV[4], ARGV[6], ARGV[7])
if rec[7] then unroute(rec[7]) end
return {'ok', score, rec[4], rec[3] or ''}
"""

# KEYS: events, record, running, queue
# ARGV: attempt, first seq, ttl or 0, outcome or '', job id, worker id or '', outcome for the
#       totals (`stats.encode_outcome`) or '', events...
# Idempotent: entries already in the stream (a retried write whose reply was lost) are skipped.
# A terminal event with a worker id also finishes the attempt (as `finish_attempt`) and adds the
# outcome to the totals, best effort: returns 'unrecorded' if that failed.
_APPEND = (
    stats.ADD_OUTCOME
    + """
local tail = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)
local last = 0
if tail[1] then last = tonumber(string.match(tail[1][1], '%d+$')) end
local seq = tonumber(ARGV[2])
if seq + #ARGV - 8 <= last then return 0 end
local rec = redis.call('hmget', KEYS[2], 'attempt', 'ended', 'ledger')
if rec[1] ~= ARGV[1] or rec[2] then return redis.error_reply('SUPERSEDED the job moved on') end
if seq > last + 1 then return redis.error_reply('GAP events are missing before ' .. seq) end
for i = 8, #ARGV do
  if seq > last then redis.call('xadd', KEYS[1], '0-' .. seq, 'e', ARGV[i]) end
  seq = seq + 1
end
if ARGV[3] ~= '0' then redis.call('expire', KEYS[1], ARGV[3]) end
if ARGV[4] ~= '' then
  redis.call('hset', KEYS[2], 'ended', ARGV[4])
  redis.call('expire', KEYS[2], ARGV[3])
  redis.call('zrem', KEYS[3], ARGV[5])
  release_holds(ARGV[5])
  charge_events(rec[3], KEYS[1], ARGV[5], ARGV[3])
  if ARGV[6] ~= '' then
    finish_attempt(KEYS[4], ARGV[5] .. '.' .. ARGV[1], ARGV[6])
    if ARGV[7] ~= '' and not pcall(add_outcome, ARGV[7]) then return 'unrecorded' end
  end
end
return 1
"""
)

_ALLOW_OOM = "#!lua flags=allow-oom\n"
"""A script's first line: it runs while Redis is full (Redis 7)."""

# KEYS: record, running   ARGV: attempt, lease ms (0: given up), job id
# A lease given up (`expire_lease`: deadline 0) stays given up, even to a renewal already on its way.
_RENEW = """
local rec = redis.call('hmget', KEYS[1], 'attempt', 'ended', 'cancel')
if rec[1] ~= ARGV[1] or rec[2] then return 'superseded' end
if ARGV[2] ~= '0' and redis.call('zscore', KEYS[2], ARGV[3]) == '0' then return 'superseded' end
redis.call('zadd', KEYS[2], ARGV[2] == '0' and 0 or server_ms() + ARGV[2], ARGV[3])
redis.call('hdel', KEYS[1], 'grace')
renew_slot(ARGV[3], KEYS[1])
if rec[3] then return 'cancel' end
return 'ok'
"""

# KEYS: record, queue   ARGV: job id, attempt, worker id, 'pushed' or 'routed'
# Undoes `place` for an attempt pushed to this worker (the claim made for it) or routed to it and
# not claimed (by this worker or any): it goes back to its place in the line, with its queue
# deadline, and every worker is told of the line's first attempt.
_DECLINE = """
local rec = redis.call('hmget', KEYS[1], 'attempt', 'ended', 'worker', 'routed')
if rec[1] ~= ARGV[2] or rec[2] then return 0 end
local id = ARGV[1] .. '.' .. ARGV[2]
if ARGV[4] == 'pushed' and rec[3] == ARGV[3] then
  redis.call('del', ARQ_IN_PROGRESS .. id)
  redis.call('hdel', KEYS[1], 'worker')
  redis.call('zrem', RUNNING, ARGV[1])
  redis.call('hincrby', WORKER_LOAD, ARGV[3], -1)
elseif ARGV[4] == 'routed' and not rec[3] and rec[4] == ARGV[3] then
  unroute(ARGV[3])
  redis.call('hdel', KEYS[1], 'routed')
else
  return 0
end
local queued = redis.call('zscore', KEYS[2], id) or 0
redis.call('zadd', WAITING, queued, id)
local waits = tonumber(redis.call('hget', KEYS[1], 'queue_timeout') or 0)
if waits > 0 then redis.call('zadd', QUEUE_DEADLINES, queued + waits, ARGV[1]) end
redis.call('publish', WAKEUP_CHANNEL, (first_waiting()))
return 1
"""

# KEYS: record, events, running, queue   ARGV: mode, job id, terminal event, outcome, ttl
_STOP = (
    _END
    + """
local rec = redis.call('hmget', KEYS[1], 'attempt', 'ended', 'worker', 'routed')
if not rec[1] then return 'missing' end
if rec[2] then return 'ended' end
if not rec[3] then
  local attempt = ARGV[2] .. '.' .. rec[1]
  if rec[4] then unroute(rec[4]) end
  redis.call('zrem', KEYS[4], attempt)
  redis.call('zrem', WAITING, attempt)
  redis.call('zrem', QUEUE_DEADLINES, ARGV[2])
  redis.call('del', ARQ_JOB .. attempt)
  finish(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
  return 'stopped'
end
if ARGV[1] == 'withdraw' then return 'running' end
redis.call('hset', KEYS[1], 'cancel', ARGV[3])  -- its worker ends it with this event
redis.call('publish', CANCEL_CHANNEL, ARGV[2])
return 'cancelling'
"""
)

# KEYS: record, events, running, queue
# ARGV: job id, now ms (a retry's time in arq's queue), max attempts, worker-lost event (after
#       output), cancelled event, ttl, arq ttl ms, worker-lost event (no output, its attempts used
#       up)
_RECOVER = (
    _END
    + """
local score = redis.call('zscore', KEYS[3], ARGV[1])
if not score or tonumber(score) > server_ms() then return 'alive' end
redis.call('zrem', KEYS[3], ARGV[1])
local rec = redis.call('hmget', KEYS[1], 'attempt', 'ended', 'cancel')
if not rec[1] or rec[2] then return 'ended' end
local attempt = tonumber(rec[1])
local old = ARGV[1] .. '.' .. attempt
local queued = redis.call('zscore', KEYS[4], old) or ARGV[2]  -- a retry keeps its place in line
redis.call('zrem', KEYS[4], old)
redis.call('del', ARQ_JOB .. old, ARQ_IN_PROGRESS .. old, ARQ_RETRY .. old)
if rec[3] then  -- the canceller's event ('1' from a version before it was kept)
  finish(KEYS[1], KEYS[2], ARGV[1], rec[3] ~= '1' and rec[3] or ARGV[5], 'cancelled', ARGV[6])
  return 'cancelled'
end
if redis.call('xlen', KEYS[2]) == 0 and attempt < tonumber(ARGV[3]) then
  local new = ARGV[1] .. '.' .. (attempt + 1)
  redis.call('hset', KEYS[1], 'attempt', attempt + 1)
  redis.call('hdel', KEYS[1], 'worker', 'routed')
  -- arq's entry for the attempt, as `serialize_job` writes it
  redis.call('psetex', ARQ_JOB .. new, ARGV[7], '{"t":null,"f":"' .. RUN_COMPLETION .. '","a":["'
    .. ARGV[1] .. '",' .. (attempt + 1) .. '],"k":{},"et":' .. queued .. '}')
  redis.call('zadd', KEYS[4], queued, new)
  local waits = tonumber(redis.call('hget', KEYS[1], 'queue_timeout') or 0)
  if waits > 0 then redis.call('zadd', QUEUE_DEADLINES, ARGV[2] + waits, ARGV[1]) end
  redis.call('expire', KEYS[1], ARGV[6] + math.ceil(waits / 1000), 'GT')  -- outlives its new wait
  wake(KEYS[1], ARGV[1], attempt + 1, queued, nil, true)
  renew_slot(ARGV[1], KEYS[1])
  return 'retried'
end
local lost = ARGV[4]
if redis.call('xlen', KEYS[2]) == 0 then lost = ARGV[8] end
finish(KEYS[1], KEYS[2], ARGV[1], lost, 'worker_lost', ARGV[6])
return 'failed'
"""
)
# KEYS: swept, running   ARGV: silence (ms), lease (ms), limit
# The ids of the expired leases. After a silence (no process swept: an outage), each lease that ran
# out gets one more from now, once until its worker renews it, in this same script: another
# process's sweep, held up by the same outage and run next, must find none of them expired.
_EXPIRED = """
local now = server_ms()
local swept = tonumber(redis.call('get', KEYS[1]) or now)
redis.call('set', KEYS[1], now)
if now - swept <= tonumber(ARGV[1]) then
  return redis.call('zrangebyscore', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[3])
end
local lost = {}
for _, id in ipairs(redis.call('zrangebyscore', KEYS[2], '-inf', now)) do
  if redis.call('zscore', KEYS[2], id) ~= '0' and redis.call('hsetnx', job_record(id), 'grace', 1) == 1 then
    redis.call('zadd', KEYS[2], now + ARGV[2], id)
  else
    table.insert(lost, id)
  end
end
return lost
"""
_RELEASE = """
local named = redis.call('get', KEYS[1])
if named and string.sub(named, 1, #ARGV[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return 0
"""
_DELETE = (
    STORED_FUNCTIONS
    + """
local rec = redis.call('hmget', KEYS[1], 'ended', 'ledger')
if redis.call('exists', KEYS[1]) == 0 then return 'missing' end
if not rec[1] then return 'running' end
redis.call('del', KEYS[1], KEYS[2], KEYS[3])
if rec[2] and rec[2] ~= '' then stored_release(rec[2], ARGV[1]) end
return 'deleted'
"""
)


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    model: str
    request_id: str
    created: int
    attempt: int
    started: bool
    ended: str | None
    cancel_requested: bool
    choices: tuple[str, ...] = ()
    """The jobs of the request's other choices, on its first job's record (`n > 1`)."""
    response_format: dict[str, Any] | None = None
    """The JSON format its reply is checked against (chat's `response_format`), if it asked for one."""
    legacy_functions: bool = False
    """Its request offered chat's legacy `functions`: calls are answered as a `function_call`."""

    @property
    def status(self) -> JobStatus:
        if self.ended is None:
            return JobStatus.IN_PROGRESS if self.started else JobStatus.QUEUED
        if self.ended == "completed":
            return JobStatus.COMPLETED
        if self.ended == FailureCode.CANCELLED.value:
            return JobStatus.CANCELLED
        return JobStatus.FAILED


@dataclass(frozen=True)
class JobSlot:
    """One of `holder`'s at most `cap` concurrent jobs, held until the job ends (or the lease)."""

    holder: str
    cap: int
    lease_ms: int


class NoJobSlot(Exception):
    """All of the holder's job slots are taken."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"at most {cap} concurrent jobs")
        self.cap = cap


class KeyRevoked(Exception):
    """The owner's API key was revoked after its request was let in (`apikeys.REVOKED`)."""


CANCELLED = Failed(code=FailureCode.CANCELLED, message="The job was cancelled.")


def cancellation(flag: bytes | None) -> Failed | None:
    """The event a cancelled job ends with, from its record's `cancel` field (`stop` keeps the
    canceller's: a revoked key's running jobs had said only that they were cancelled)."""
    if not flag:
        return None
    event = CANCELLED if flag == b"1" else decode_event(flag)  # b"1": kept by an earlier version
    return event if isinstance(event, Failed) else CANCELLED


@dataclass(frozen=True)
class Claimed:
    score: int
    job: CompletionJob
    cancelled: Failed | None
    """Cancelled while its previous attempt's worker was lost: the event it ends with."""


@dataclass(frozen=True)
class AttemptEnd:
    """What the write of an attempt's terminal event also records, in the same round trip."""

    worker_id: str
    """The worker that ran it: the attempt leaves arq's queue and this worker's load."""
    outcome: stats.JobRecord
    """How the job went, for the shared totals (best effort)."""
    failures_kept: int


def _ms() -> int:
    return int(time.time() * 1000)


class JobStore:
    """The job records on one Redis connection pool, for both processes."""

    def __init__(
        self,
        redis: Redis,
        *,
        queue_name: str,
        ttl_s: int,
        affinity_s: float = 0.0,
        push_lease_s: float | None = None,
        failures_kept: int = 100,
        session_ttl_s: int = 3600,
    ) -> None:
        """`affinity_s`: how long a session's job waits for the worker holding its workspace.
        `push_lease_s`: `create` pushes a job to the worker it chooses, and the end of an attempt
        the line's first job to the worker it ran on, claimed with this lease, where that worker
        takes pushes (else it wakes the worker to claim it). `failures_kept`:
        the recent failures kept for `status` (`RECENT_FAILURES_KEPT`), among them the jobs this
        store ends itself. `session_ttl_s`: `SESSION_TTL_S`, a session's clock restarted when a turn
        that held it ends without a commit."""
        self.redis = redis
        self.session_ttl_s = session_ttl_s
        self.queue_name = queue_name
        self.ttl_s = ttl_s
        self.affinity_ms = int(affinity_s * 1000)
        self.push_lease_ms = None if push_lease_s is None else int(push_lease_s * 1000)
        self.channels = Channels.of(redis)
        self._retries: set[asyncio.Task[int]] = set()
        prelude = _prelude(self.channels, failures_kept, self.push_lease_ms, ttl_s)
        # New work and its output wait while Redis is full (`maxmemory`, `noeviction`); what keeps
        # the running jobs' leases, ends a job or gives it back writes a few bytes, and runs: else
        # a full Redis would fail healthy jobs as lost, and no queued job could be withdrawn.
        bookkeeping = _ALLOW_OOM + prelude
        self._create = redis.register_script(prelude + _CREATE)
        self._claim = redis.register_script(prelude + _CLAIM)
        self._append = redis.register_script(prelude + _APPEND)
        self._end_in_full_redis = redis.register_script(bookkeeping + _APPEND)
        self._renew = redis.register_script(bookkeeping + _RENEW)
        self._finish = redis.register_script(bookkeeping + "finish_attempt(KEYS[1], ARGV[1], ARGV[2])")
        self._stop = redis.register_script(bookkeeping + _STOP)
        self._decline = redis.register_script(bookkeeping + _DECLINE)
        self._recover = redis.register_script(bookkeeping + _RECOVER)
        self._expired = redis.register_script(bookkeeping + _EXPIRED)
        self._delete = redis.register_script(_DELETE)
        self._release = redis.register_script(_RELEASE)

    # --- API ----------------------------------------------------------------------------
    async def create(
        self,
        job: CompletionJob,
        *,
        owner: str,
        idempotency: tuple[str, str] | None = None,
        slot: JobSlot | None = None,
        choices: Sequence[str] = (),
        queue_timeout_s: float | None = None,
        stored: StoredLimit | None = None,
    ) -> tuple[str, str] | None:
        """Queues a new job and wakes the worker chosen to run it, in one round trip.

        With `idempotency=(key, fingerprint)`, a key this owner used before returns the earlier
        `(job id, fingerprint)` instead and queues nothing. If no worker has started it within
        `queue_timeout_s`, the workers withdraw it (`withdraw_due`). With `slot`, it takes one of its
        holder's slots, and one for each of its request's other `choices` (created next), or
        raises `NoJobSlot` and queues nothing. With `stored`, its events count in that ledger once
        it ends, and it is refused (`StorageLimit`) while the ledger is at its limit. An `owner`
        whose key was revoked gets none (`KeyRevoked`).
        """
        now = _ms()
        entry = serialize_job(RUN_COMPLETION, (job.id, 1), {}, None, now, serializer=serialize)
        keys = [record_key(job.id), self.queue_name, job_key_prefix + attempt_id(job.id, 1)]
        value = ""
        if idempotency is not None:
            keys.append(idempotency_key(owner, idempotency[0]))
            value = f"{job.id} {idempotency[1]}"
        # Lives at least as long as it may wait: a background job queued longer than EVENT_TTL_S
        # had vanished unanswered, its session and slot held (a re-check probe).
        record_ttl_s = self.ttl_s + math.ceil(queue_timeout_s or 0)
        args: list[str | bytes | int] = [owner, job.model, job.request_id, job.created]
        args += [job.model_dump_json(), entry, now, expires_extra_ms, record_ttl_s, job.id, value]
        if (ref := job.session) is None:
            args.append("")
        else:
            ledger = None if stored is None else stored.ledger
            args.append(sessions.clock(ref.owner, ref.id, ref.transcript_id, self.session_ttl_s, ledger))
        args += ["", 0, 0] if slot is None else [slots_key(slot.holder), slot.cap, slot.lease_ms]
        holder = job.session.holder if job.session is not None and self.affinity_ms else None
        waits = 0 if queue_timeout_s is None else int(queue_timeout_s * 1000)
        args += [holder or "", now + self.affinity_ms, waits]
        args += ["", 0] if stored is None else [stored.ledger, stored.limit]
        args += choices
        try:
            existing = await self._create(keys=keys, args=args)
        except ResponseError as exc:
            refusal, _, wait_ms = str(exc).partition(" ")
            if refusal == "NO_SLOT":
                raise NoJobSlot(slot.cap if slot is not None else 0) from None
            if refusal == "STORAGE_LIMIT" and stored is not None:
                raise StorageLimit(stored.limit, int(wait_ms)) from None
            if refusal == "KEY_REVOKED":
                raise KeyRevoked from None
            raise
        if existing is None:
            return None
        job_id, _, fingerprint = existing.decode().partition(" ")
        return job_id, fingerprint

    async def get(self, job_id: str) -> JobRecord | None:
        fields: dict[bytes, bytes] = await self.redis.hgetall(record_key(job_id))  # type: ignore[misc]
        if not fields:
            return None
        get = {k.decode(): v.decode() for k, v in fields.items()}.get
        return JobRecord(
            id=job_id,
            owner=get("owner", ""),
            model=get("model", ""),
            request_id=get("request_id", ""),
            created=int(get("created", "0")),
            attempt=int(get("attempt", "1")),
            started=get("worker") is not None,
            ended=get("ended"),
            cancel_requested=get("cancel") is not None,
            choices=tuple(get("choices", "").split()),
            response_format=json.loads(response_format) if (response_format := get("format")) else None,
            legacy_functions=get("legacy") is not None,
        )

    async def cancellation(self, job_id: str) -> Failed | None:
        """The event the job ends with if it was cancelled (`cancellation`)."""
        return cancellation(await self.redis.hget(record_key(job_id), "cancel"))  # type: ignore[misc]

    async def last_event(self, job_id: str) -> int:
        """The sequence number of the job's last event so far (0: none yet)."""
        tail = await self.redis.xrevrange(events_key(job_id), count=1)
        return int(tail[0][0].partition(b"-")[2]) if tail else 0

    async def stop(
        self, job_id: str, *, withdraw_only: bool, failure: Failed
    ) -> Literal["missing", "ended", "stopped", "running", "cancelling"]:
        """Cancels a job (`withdraw_only=False`) or withdraws it if it has not started yet.

        A job no worker has started ends at once with `failure`; a running one is flagged and its
        worker told (cancel only). Idempotent: an ended job is left as it is.
        """
        keys = [record_key(job_id), events_key(job_id), RUNNING, self.queue_name]
        mode = "withdraw" if withdraw_only else "cancel"
        args: list[str | bytes | int] = [mode, job_id, encode_event(failure), failure.code.value, self.ttl_s]
        result: bytes = await self._stop(keys=keys, args=args)
        return result.decode()  # type: ignore[return-value]

    async def stop_owned(self, owner: str, failure: Failed) -> int:
        """Cancels every job of `owner` (an API key's id) queued or running: its key was revoked.
        How many were stopped or are being stopped."""
        running: list[bytes] = await self.redis.zrange(RUNNING, 0, -1)
        queued: list[bytes] = await self.redis.zrange(self.queue_name, 0, -1)
        job_ids = {m.decode() for m in running} | {m.decode().rpartition(".")[0] for m in queued}
        stopped = 0
        for job_id in filter(is_job_id, job_ids):
            if await self.redis.hget(record_key(job_id), "owner") == owner.encode():  # type: ignore[misc]
                stopped += await self.stop(job_id, withdraw_only=False, failure=failure) in (
                    "stopped",
                    "cancelling",
                )
        return stopped

    async def delete(self, job_id: str) -> Literal["deleted", "running", "missing"]:
        """Removes an ended job: its record, its events and what a front end kept beside it (the
        Responses API's request). A job not ended yet keeps them (its worker writes on)."""
        keys = [record_key(job_id), events_key(job_id), response_key(job_id)]
        result: bytes = await self._delete(keys=keys, args=[job_id])
        return result.decode()  # type: ignore[return-value]

    async def idempotent_job(self, owner: str, key: str) -> tuple[str, str] | None:
        """The `(job id, fingerprint)` that `owner`'s `Idempotency-Key` names, if it names one."""
        found: bytes | None = await self.redis.get(idempotency_key(owner, key))
        if found is None:
            return None
        job_id, _, fingerprint = found.decode().partition(" ")
        return job_id, fingerprint

    async def release_idempotency(self, owner: str, key: str, job_id: str) -> None:
        """Frees `owner`'s `Idempotency-Key` if it still names `job_id` (a job that is gone)."""
        await self._release(keys=[idempotency_key(owner, key)], args=[job_id + " "])

    async def keep_reply_form(
        self, job_id: str, *, response_format: dict[str, Any] | None, legacy_functions: bool
    ) -> None:
        """Records the form its request asked the reply in (`JobRecord.response_format`,
        `legacy_functions`), for its retrieval and resume."""
        form = {"format": json.dumps(response_format)} if response_format is not None else {}
        form |= {"legacy": "1"} if legacy_functions else {}
        if form:
            await self.redis.hset(record_key(job_id), mapping=form)  # type: ignore[misc]

    async def link_choices(self, job_id: str, others: list[str]) -> None:
        """Records on a request's first job the jobs of its other choices (`n > 1`)."""
        await self.redis.hset(record_key(job_id), "choices", " ".join(others))  # type: ignore[misc]

    # --- worker -------------------------------------------------------------------------
    async def claim(
        self,
        job_id: str,
        attempt: int,
        *,
        worker_id: str,
        in_progress_ms: int,
        lease_s: float,
    ) -> Claimed | Literal["taken", "full"] | None:
        """Claims a queued attempt for this worker and takes its lease; None if it is not ours,
        "taken" if a worker claimed it (no worker ever will again: it stays in arq's queue only
        until it ends), "full" if this worker's slots are all counted taken (a job pushed to it)."""
        keys = [record_key(job_id), self.queue_name]
        now = _ms()
        args: list[str | int] = [job_id, attempt, now, in_progress_ms, worker_id]
        args += [int(lease_s * 1000), self.ttl_s]
        reply = await self._claim(keys=keys, args=args)
        if reply is not None and reply[0] == b"defer":  # look again when the offer runs out
            self._wake_later(attempt_id(job_id, attempt), int(reply[1]) / 1000)
        if reply is not None and reply[0] in (b"taken", b"full"):
            return "taken" if reply[0] == b"taken" else "full"
        if reply is None or reply[0] != b"ok":
            return None
        job = CompletionJob.model_validate_json(reply[2])
        return Claimed(score=int(float(reply[1])), job=job, cancelled=cancellation(reply[3]))

    @staticmethod
    def pushed(message: bytes) -> tuple[str, int, Claimed | None]:
        """A job `create` pushed (`push_to`): its id, its attempt, and the claim made for it (None
        if this version cannot read the job: the worker gives it back)."""
        attempt, score, payload = message.split(b" ", 2)
        job_id, _, number = attempt.decode().partition(".")
        try:
            job = CompletionJob.model_validate_json(payload)
        except ValidationError:
            log.exception("a job pushed as attempt %s could not be read", attempt.decode())
            return job_id, int(number), None
        return job_id, int(number), Claimed(int(score), job, cancelled=None)

    async def decline(
        self, job_id: str, attempt: int, worker_id: str, how: Literal["pushed", "routed"] = "pushed"
    ) -> bool:
        """Gives back an attempt pushed to this worker, or routed to it and not claimed, for any
        worker; False if it is not (claimed, retried, or ended meanwhile: a routed attempt this
        worker claimed is its own to run)."""
        keys = [record_key(job_id), self.queue_name]
        return bool(await self._decline(keys=keys, args=[job_id, attempt, worker_id, how]))

    async def finish_attempt(self, attempt: str, worker_id: str) -> None:
        """Takes an attempt that ran off arq's queue (arq's `finish_job`) and off its worker's
        load, in one round trip: for an attempt whose terminal write did not (`AttemptEnd`)."""
        await self._finish(keys=[self.queue_name], args=[attempt, worker_id])

    def _wake_later(self, attempt: str, delay_s: float) -> None:
        async def wake() -> int:
            await asyncio.sleep(delay_s)
            return int(await self.redis.publish(self.channels.wakeup, attempt))

        task = asyncio.create_task(wake())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def renew(self, job_id: str, attempt: int, lease_s: float) -> Literal["ok", "cancel", "superseded"]:
        return await self._set_lease(job_id, attempt, int(lease_s * 1000))

    async def _set_lease(
        self, job_id: str, attempt: int, lease_ms: int
    ) -> Literal["ok", "cancel", "superseded"]:
        keys = [record_key(job_id), RUNNING]
        result: bytes = await self._renew(keys=keys, args=[attempt, lease_ms, job_id])
        return result.decode()  # type: ignore[return-value]

    async def expire_lease(self, job_id: str, attempt: int) -> None:
        """Lets the next `recover_expired` take this attempt's job (used to hand a job back)."""
        await self._set_lease(job_id, attempt, 0)

    async def append(
        self,
        job_id: str,
        attempt: int,
        first_seq: int,
        events: list[bytes],
        *,
        outcome: str,
        ttl_s: int,
        end: AttemptEnd | None = None,
        in_full_redis: bool = False,
    ) -> None:
        """Writes events `first_seq...` of the current attempt; raises `ResponseError` if superseded.

        With `outcome` (the last event is terminal) and `end`, the same round trip finishes the
        attempt and adds its outcome to the totals (a failure there is logged, not raised).
        `in_full_redis`: an attempt's end alone, written even while Redis is full."""
        assert not in_full_redis or (len(events) == 1 and outcome), "only an end is written in a full Redis"
        keys = [events_key(job_id), record_key(job_id), RUNNING, self.queue_name]
        args: list[str | bytes | int] = [attempt, first_seq, ttl_s, outcome, job_id]
        if end is None:
            args += ["", ""]
        else:
            args += [end.worker_id, stats.encode_outcome(end.outcome, failures_kept=end.failures_kept)]
        append = self._end_in_full_redis if in_full_redis else self._append
        if await append(keys=keys, args=[*args, *events]) == b"unrecorded":
            log.warning("could not record the outcome of job %s in the totals", job_id)

    async def withdraw_due(self, limit: int = 64) -> list[str]:
        """Withdraws jobs no worker started within their queue timeout (`create`): background ones,
        and those whose request left (found by an outside probe: an abandoned stream's job waited
        until BACKGROUND_QUEUE_TIMEOUT_S, holding its caller's slot, then ran for no one)."""
        due = await self.redis.zrangebyscore(QUEUE_DEADLINES, "-inf", _ms(), 0, limit)
        failure = Failed(
            code=FailureCode.QUEUE_TIMEOUT,
            message="No worker started the job within its queue timeout (QUEUE_TIMEOUT_S, or "
            "BACKGROUND_QUEUE_TIMEOUT_S for a background job).",
        )
        withdrawn = []
        for raw in due:
            job_id = raw.decode()
            if await self.stop(job_id, withdraw_only=True, failure=failure) == "stopped":
                withdrawn.append(job_id)
            await self.redis.zrem(QUEUE_DEADLINES, job_id)  # started, ended or gone: no deadline
        return withdrawn

    async def recover_expired(
        self, max_attempts: int, lease_s: float, limit: int = 16
    ) -> list[tuple[str, str]]:
        """Handles jobs whose lease ran out: `(job id, "retried" | "failed" | "cancelled")`.

        A lease measures the time its worker could have renewed it: after a silence of half a lease
        in which no process swept (an outage: workers sweep every `lease_renew_s`), each lease that
        ran out gets one more from now, its worker being as cut off as the rest; renewing it ends the
        grace. A job whose worker died meanwhile is recovered when the granted lease runs out.
        """
        lease_ms = int(lease_s * 1000)
        expired = await self._expired(keys=[SWEPT, RUNNING], args=[lease_ms // 2, lease_ms, limit])
        now = _ms()
        lost = encode_event(
            Failed(
                code=FailureCode.WORKER_LOST,
                message="The worker running this job stopped after it had produced output.",
            )
        )
        every_attempt_lost = encode_event(
            Failed(
                code=FailureCode.WORKER_LOST,
                message="The worker running this job stopped before any output, on every attempt it was "
                f"given (MAX_ATTEMPTS={max_attempts}).",
            )
        )
        cancelled = encode_event(CANCELLED)
        outcomes = []
        for raw in expired:
            job_id = raw.decode()
            keys = [record_key(job_id), events_key(job_id), RUNNING, self.queue_name]
            args: list[str | bytes | int] = [job_id, now, max_attempts, lost, cancelled]
            args += [self.ttl_s, expires_extra_ms, every_attempt_lost]
            outcome: bytes = await self._recover(keys=keys, args=args)
            if outcome != b"alive":
                outcomes.append((job_id, outcome.decode()))
        return outcomes

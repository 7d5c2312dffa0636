"""The control store on Redis (redis-py's asyncio client): one small Lua script per change.

Every write that must be atomic with a check (a route change against a running
rollout, a driver's write against its lease, a token bucket) is one script, run by
its SHA (reloaded when a restarted Redis lost it). Clocks are the server's (``TIME``),
so gateways on hosts whose clocks differ agree on buckets and heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from serving.config import ControlConfig
from serving.control.store import (
    ControlStore,
    GatewayInfo,
    RouteSnapshot,
    StoreConflict,
    StoreUnavailable,
    redacted,
)

__all__ = ["RedisControlStore"]

log = logging.getLogger("fermion.control")

_T = TypeVar("_T")

# KEYS: routes, version, rollouts, lease. ARGV: name, route json ("" removes), fence ("" by hand).
_SET_ROUTE = """
if ARGV[3] == '' then
  local st = redis.call('HGET', KEYS[3], ARGV[1])
  if st and cjson.decode(st)['status'] == 'running' then return -1 end
elseif redis.call('GET', KEYS[4]) ~= ARGV[3] then
  return -2
end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return redis.call('INCR', KEYS[2])
"""
# KEYS: routes, version. ARGV: version, then name, json pairs.
_SEED_ROUTES = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""
# KEYS: routes, version. Returns {version or false, flat hash}.
_READ_ROUTES = """
return {redis.call('GET', KEYS[2]), redis.call('HGETALL', KEYS[1])}
"""
# KEYS: rollouts. ARGV: name, json.
_CREATE_ROLLOUT = """
local st = redis.call('HGET', KEYS[1], ARGV[1])
if st and cjson.decode(st)['status'] == 'running' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# KEYS: rollouts, lease. ARGV: name, json, fence.
_SAVE_ROLLOUT = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# KEYS: lease, fence counter. ARGV: holder, ttl ms, force ("1" takes it from its holder).
# The value is "holder|token"; the token only grows, so an old holder's writes are refused.
_ACQUIRE = """
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = ARGV[1] .. '|' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
# KEYS: lease. ARGV: value, ttl ms (0: release).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""
# KEYS: figure sets. ARGV[i]: a JSON object of field -> number for KEYS[i]; ARGV[#KEYS+1]: ttl ms.
_ADD_FIGURES = """
local ttl = ARGV[#KEYS + 1]
for i, key in ipairs(KEYS) do
  for field, value in pairs(cjson.decode(ARGV[i])) do
    if string.sub(field, 1, 3) == 'max' then
      local old = tonumber(redis.call('HGET', key, field))
      if old == nil or value > old then redis.call('HSET', key, field, value) end
    else
      redis.call('HINCRBYFLOAT', key, field, value)
    end
  end
  redis.call('PEXPIRE', key, ttl)
end
return 1
"""
_TAKE_FIGURES = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGETALL', key)
  redis.call('DEL', key)
end
return out
"""
# A token bucket on the server's clock. KEYS: bucket. ARGV: rate/s, burst, wanted (0: give back
# ARGV[4] tokens). Returns {taken, microseconds until the next token}.
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wanted = tonumber(ARGV[3])
local taken = 0
if wanted > 0 then
  taken = math.min(wanted, math.floor(tokens))
  tokens = tokens - taken
else
  tokens = math.min(burst, tokens + tonumber(ARGV[4]))
end
local wait = 0
if tokens < 1 then wait = math.ceil((1 - tokens) / rate * 1e6) end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {taken, wait}
"""
# KEYS: gateway hash, heartbeat zset. ARGV: id, json, stale seconds, forget seconds.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
for _, id in ipairs(gone) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[3]), '+inf')
"""
_GATEWAYS = """
local t = redis.call('TIME')
return {t[1] .. '.' .. string.format('%06d', t[2]), redis.call('HGETALL', KEYS[1]),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""
#: Figure sets nobody takes (no driver) expire after this.
_FIGURES_TTL_MS = 3_600_000
#: Gateways silent this long are dropped from the fleet listing.
_FORGET_S = 300.0


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raise_swallowed_cancel(task: asyncio.Task[Any] | None, cancels: int) -> None:
    """Raise the CancelledError that a redis-py call swallowed while ``task`` was cancelled.

    redis-py writes a command under ``asyncio.wait_for``, which before Python 3.12 returns
    the result, and drops the cancellation, when the write completes as the task is
    cancelled (CPython gh-86296). Against a real Redis, a loop of commands cancelled at a
    random moment ran on in about a third of 200 tries; a loop that handles
    ``StoreUnavailable`` (the fleet sync) then never ends, and the gateway's shutdown waits
    for it forever. ``Task.cancelling()`` still counts the request, so it is raised here.
    """
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError


class RedisControlStore(ControlStore):
    """Control state in one Redis (a URL such as ``redis://host:6379/0``)."""

    def __init__(self, config: ControlConfig) -> None:
        self._url = redacted(config.store)
        self._prefix = config.key_prefix
        self._client = aioredis.Redis.from_url(
            config.store,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            # One immediate retry on a broken connection only: a Redis restarted since a
            # pooled connection was opened leaves it dead, and the retry takes a fresh one.
            # A timeout is not retried: the store counts as down at once.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        register = self._client.register_script
        self._set_route = register(_SET_ROUTE)
        self._seed_routes = register(_SEED_ROUTES)
        self._read_routes = register(_READ_ROUTES)
        self._create_rollout = register(_CREATE_ROLLOUT)
        self._save_rollout = register(_SAVE_ROLLOUT)
        self._acquire = register(_ACQUIRE)
        self._renew = register(_RENEW)
        self._add_figures = register(_ADD_FIGURES)
        self._take_figures = register(_TAKE_FIGURES)
        self._bucket = register(_BUCKET)
        self._heartbeat = register(_HEARTBEAT)
        self._gateways = register(_GATEWAYS)
        self.up = False

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def _call(self, what: Awaitable[_T]) -> _T:
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            result = await what
        except (RedisError, OSError) as e:
            _raise_swallowed_cancel(task, cancels)
            if self.up:
                log.warning("control store %s is down: %s", self._url, e)
            self.up = False
            raise StoreUnavailable(
                f"the control store is unavailable ({type(e).__name__}: {e}); route changes "
                "and rollouts wait for it, inference goes on with the last applied routes"
            ) from None
        _raise_swallowed_cancel(task, cancels)
        if not self.up:
            log.info("control store %s is up", self._url)
        self.up = True
        return result

    async def start(self) -> None:
        try:
            await self._call(self._client.ping())
        except StoreUnavailable:
            log.warning(
                "control store %s is not reachable yet; retrying in the background", self._url
            )

    async def close(self) -> None:
        await self._client.aclose()

    # ----------------------------------------------------------------- routes

    async def route_version(self) -> int | None:
        raw = await self._call(self._client.get(self._key("routes", "version")))
        return None if raw is None else int(raw)

    async def routes(self) -> RouteSnapshot | None:
        keys = [self._key("routes"), self._key("routes", "version")]
        version, flat = await self._call(self._read_routes(keys=keys))
        if version is None:
            return None
        return RouteSnapshot(int(version), _pairs(flat))

    async def seed_routes(self, snapshot: RouteSnapshot) -> bool:
        keys = [self._key("routes"), self._key("routes", "version")]
        args: list[str] = [str(snapshot.version)]
        for name, route in sorted(snapshot.routes.items()):
            args += [name, route]
        return bool(await self._call(self._seed_routes(keys=keys, args=args)))

    async def set_route(self, name: str, route_json: str | None, *, fence: str | None) -> int:
        keys = [
            self._key("routes"),
            self._key("routes", "version"),
            self._key("rollouts"),
            self._key("lease", name),
        ]
        args = [name, route_json or "", fence or ""]
        version = int(await self._call(self._set_route(keys=keys, args=args)))
        if version == -1:
            raise StoreConflict(f"a rollout of {name} is running; stop it first")
        if version == -2:
            raise StoreConflict(f"this gateway no longer drives the rollout of {name}")
        return version

    # ----------------------------------------------------------------- rollouts

    async def rollouts(self) -> dict[str, str]:
        flat = await self._call(self._client.hgetall(self._key("rollouts")))
        return {_text(k): _text(v) for k, v in flat.items()}

    async def create_rollout(self, name: str, state_json: str) -> None:
        done = await self._call(
            self._create_rollout(keys=[self._key("rollouts")], args=[name, state_json])
        )
        if not done:
            raise StoreConflict(f"a rollout of {name} is already running")

    async def save_rollout(self, name: str, state_json: str, *, fence: str) -> bool:
        keys = [self._key("rollouts"), self._key("lease", name)]
        return bool(await self._call(self._save_rollout(keys=keys, args=[name, state_json, fence])))

    async def seed_rollouts(self, states: Mapping[str, str]) -> None:
        if not states:
            return
        pipe = self._client.pipeline(transaction=False)
        for name, state in states.items():
            pipe.hsetnx(self._key("rollouts"), name, state)
        await self._call(pipe.execute())

    async def acquire_lease(
        self, name: str, holder: str, ttl_s: float, *, force: bool = False
    ) -> str | None:
        keys = [self._key("lease", name), self._key("fence", name)]
        args: list[str | int] = [holder, int(ttl_s * 1000), "1" if force else "0"]
        value = await self._call(self._acquire(keys=keys, args=args))
        return None if value is None else _text(value)

    async def renew_lease(self, name: str, fence: str, ttl_s: float) -> bool:
        keys = [self._key("lease", name)]
        return bool(
            await self._call(self._renew(keys=keys, args=[fence, max(1, int(ttl_s * 1000))]))
        )

    async def release_lease(self, name: str, fence: str) -> None:
        await self._call(self._renew(keys=[self._key("lease", name)], args=[fence, 0]))

    # ----------------------------------------------------------------- figures

    async def add_figures(self, figures: Mapping[str, Mapping[str, float]]) -> None:
        if not figures:
            return
        keys = [self._key("figures", name) for name in figures]
        args = [orjson.dumps(dict(fields)).decode() for fields in figures.values()]
        await self._call(self._add_figures(keys=keys, args=[*args, _FIGURES_TTL_MS]))

    async def take_figures(self, names: list[str]) -> dict[str, dict[str, float]]:
        keys = [self._key("figures", name) for name in names]
        flats = await self._call(self._take_figures(keys=keys))
        return {
            name: {k: float(v) for k, v in _pairs(flat).items()}
            for name, flat in zip(names, flats, strict=True)
        }

    # ----------------------------------------------------------------- rate limits

    async def take_tokens(
        self, bucket: str, rate: float, burst: int, wanted: int
    ) -> tuple[int, float]:
        taken, wait_us = await self._call(
            self._bucket(keys=[self._key("bucket", bucket)], args=[repr(rate), burst, wanted, 0])
        )
        return int(taken), int(wait_us) / 1e6

    async def give_tokens(self, bucket: str, rate: float, burst: int, count: int) -> None:
        await self._call(
            self._bucket(keys=[self._key("bucket", bucket)], args=[repr(rate), burst, 0, count])
        )

    # ----------------------------------------------------------------- gateways

    async def heartbeat(self, gateway: str, info: Mapping[str, object], stale_s: float) -> int:
        keys = [self._key("gateways"), self._key("gateways", "seen")]
        args = [gateway, orjson.dumps(dict(info)).decode(), repr(stale_s), repr(_FORGET_S)]
        return int(await self._call(self._heartbeat(keys=keys, args=args)))

    async def gateways(self) -> list[GatewayInfo]:
        keys = [self._key("gateways"), self._key("gateways", "seen")]
        now, flat, seen = await self._call(self._gateways(keys=keys))
        infos, stamps = _pairs(flat), _pairs(seen)
        clock = float(_text(now))
        return [
            GatewayInfo(gid, orjson.loads(infos[gid]), max(0.0, clock - float(stamps[gid])))
            for gid in sorted(infos)
            if gid in stamps
        ]

    async def leave(self, gateway: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self._key("gateways"), gateway)
        pipe.zrem(self._key("gateways", "seen"), gateway)
        await self._call(pipe.execute())

"""Per-ref records and manifests in Redis; every write one Lua script.

Layout (``P`` = prefix, default ``blobchain:``):

- ``P ref:<id>``: a hash: ``spec`` (canonical JSON), ``blob`` (JSON of the main blob), ``diff_id``,
  ``variants`` (JSON array, insertion order), ``vk:<variant>`` markers (one per stored variant,
  main included), ``chain_id``, ``blob_chain_id``, ``dmg:<digest>`` markers (blobs found corrupt,
  until rebuilt or re-verified).
- ``P refs``: the set of ref ids (so listing never SCANs the keyspace).
- ``P lease:<key>``: the single-flight claim token (written by ``RedisClaimService``); writes given
  ``token=`` are fenced on it.
- ``P manifests``: hash manifest name -> JSON list of digests.

GC leases live in :mod:`blobchain.storage.leases.redis`. This targets a single Redis node, not
Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from blobchain.layers.errors import (
    RefNotFound,
)
from blobchain.layers.records import LayerBlob, RefRecord, RefSpec
from blobchain.storage.claims import ClaimLost
from blobchain.storage.claims.redis import claim_key
from blobchain.storage.metadata.base import MetadataBase
from blobchain.storage.redis_util import describe_redis, redis_errors

__all__ = ["RedisMetadataStore"]

# Shared head of the write scripts: KEYS[1] = ref hash, KEYS[2] = claim key; ARGV[1] = fencing
# token ('' = unfenced), ARGV[2] = '1' to release the claim in the same step.
_FENCE = """
local token = ARGV[1]
if token ~= '' and redis.call('GET', KEYS[2]) ~= token then
  return {'lease_lost'}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'not_found'}
end
"""

_DONE = """
if token ~= '' and ARGV[2] == '1' then
  redis.call('DEL', KEYS[2])
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 'ok')
return out
"""

# KEYS[1] = ref hash, KEYS[2] = ref index; ARGV[1] = canonical spec JSON, ARGV[2] = ref id.
_REGISTER = """
local cur = redis.call('HGET', KEYS[1], 'spec')
if cur then
  if cur ~= ARGV[1] then
    return {'conflicting_parent', cur}
  end
else
  redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'variants', '[]')
  redis.call('SADD', KEYS[2], ARGV[2])
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 'ok')
return out
"""

# ARGV[3] = blob JSON, ARGV[4] = diffID, ARGV[5] = variant key, ARGV[6] = blob digest.
_SET_BLOB = (
    _FENCE
    + """
redis.call('HDEL', KEYS[1], 'dmg:' .. ARGV[6])
local main = redis.call('HGET', KEYS[1], 'diff_id')
local vk = 'vk:' .. ARGV[5]
if not main then
  redis.call('HSET', KEYS[1], 'blob', ARGV[3], 'diff_id', ARGV[4], vk, '1')
elseif main ~= ARGV[4] then
  return {'conflict', main}
elseif redis.call('HEXISTS', KEYS[1], vk) == 0 then
  local v = redis.call('HGET', KEYS[1], 'variants')
  if (not v) or v == '[]' then
    v = '[' .. ARGV[3] .. ']'
  else
    v = string.sub(v, 1, -2) .. ',' .. ARGV[3] .. ']'
  end
  redis.call('HSET', KEYS[1], 'variants', v, vk, '1')
end
"""
    + _DONE
)

# ARGV[3] = chain ID, ARGV[4] = blob chain ID. Never overwrites.
_SET_CHAIN = (
    _FENCE
    + """
if redis.call('HEXISTS', KEYS[1], 'chain_id') == 0 then
  redis.call('HSET', KEYS[1], 'chain_id', ARGV[3], 'blob_chain_id', ARGV[4])
end
"""
    + _DONE
)

# ARGV[3] = digest, ARGV[4] = '1' to mark, '0' to clear.
_DAMAGED = (
    _FENCE
    + """
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'dmg:' .. ARGV[3], '1')
else
  redis.call('HDEL', KEYS[1], 'dmg:' .. ARGV[3])
end
"""
    + _DONE
)

# KEYS[1] = ref key prefix; ARGV[1] = ref id, ARGV[2] = most refs to return. Walks parent links
# server-side: a ref's whole ancestry in one round trip, whatever the chain's depth.
_CHAIN_SPECS = """
local out = {}
local cur = ARGV[1]
local n = 0
while cur and n < tonumber(ARGV[2]) do
  local spec = redis.call('HGET', KEYS[1] .. cur, 'spec')
  if not spec then
    break
  end
  table.insert(out, spec)
  local p = cjson.decode(spec)['parent']
  if p == nil or p == cjson.null then
    cur = nil
  else
    cur = p
  end
  n = n + 1
end
return out
"""
# A chain longer than this is walked in several round trips (and a cycle stops the walk).
_CHAIN_BATCH = 4096


def _canon(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _record(flat: Sequence[Any]) -> RefRecord:
    h = {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
    return RefRecord(
        spec=RefSpec.from_dict(json.loads(h["spec"])),
        blob=LayerBlob.from_dict(json.loads(h["blob"])) if "blob" in h else None,
        chain_id=h.get("chain_id"),
        blob_chain_id=h.get("blob_chain_id"),
        variants=tuple(LayerBlob.from_dict(v) for v in json.loads(h.get("variants") or "[]")),
        damaged=tuple(sorted(k[4:] for k in h if k.startswith("dmg:"))),
    )


class RedisMetadataStore(MetadataBase):
    """:class:`MetadataStore` on one Redis node (redis-py client passed in)."""

    def __init__(self, client: redis.Redis, prefix: str = "blobchain:") -> None:
        self.client = client
        self.prefix = prefix
        self._register_script = client.register_script(_REGISTER)
        self._set_blob_script = client.register_script(_SET_BLOB)
        self._set_chain_script = client.register_script(_SET_CHAIN)
        self._damaged_script = client.register_script(_DAMAGED)
        self._chain_specs = client.register_script(_CHAIN_SPECS)

    # --- keys ---------------------------------------------------------------------------------

    def _ref(self, ref_id: str) -> str:
        return f"{self.prefix}ref:{ref_id}"

    @property
    def _refs(self) -> str:
        return f"{self.prefix}refs"

    @property
    def _manifests(self) -> str:
        return f"{self.prefix}manifests"

    # --- records ------------------------------------------------------------------------------

    def get(self, ref_id: str) -> RefRecord | None:
        with redis_errors(self.client, f"read ref {ref_id}"):
            flat = self.client.hgetall(self._ref(ref_id))
        if not flat:
            return None
        return _record([x for kv in flat.items() for x in kv])

    def chain_specs(self, ref_id: str) -> dict[str, RefSpec]:
        """The specs of ``ref_id`` and its registered ancestors (stops at a missing parent or a
        cycle; the caller's ancestry walk reports those), in one round trip per 4096 refs."""
        out: dict[str, RefSpec] = {}
        cur: str | None = ref_id
        while cur is not None and cur not in out:
            with redis_errors(self.client, f"read ancestry of ref {cur}"):
                raw = self._chain_specs(keys=[f"{self.prefix}ref:"], args=[cur, _CHAIN_BATCH])
            if not raw:
                break
            spec = None
            for item in raw:
                spec = RefSpec.from_dict(json.loads(_s(item)))
                if spec.ref_id in out:
                    return out
                out[spec.ref_id] = spec
            cur = spec.parent if spec is not None and len(raw) == _CHAIN_BATCH else None
        return out

    def _register(self, spec: RefSpec) -> tuple[RefRecord | None, RefSpec | None]:
        with redis_errors(self.client, f"register ref {spec.ref_id}"):
            out = self._register_script(
                keys=[self._ref(spec.ref_id), self._refs], args=[_canon(spec.to_dict()), spec.ref_id]
            )
        if _s(out[0]) == "conflicting_parent":
            return None, RefSpec.from_dict(json.loads(_s(out[1])))
        return _record(out[1:]), None

    def _set_blob(
        self, ref_id: str, blob: LayerBlob, token: str | None, claim_key: str | None, release: bool
    ) -> tuple[RefRecord | None, str | None]:
        out = self._write(
            self._set_blob_script,
            "set blob",
            ref_id,
            token,
            claim_key,
            release,
            [_canon(blob.to_dict()), blob.diff_id, blob.variant, blob.digest],
        )
        if _s(out[0]) == "conflict":
            return None, _s(out[1])
        return _record(out[1:]), None

    def _set_chain(
        self,
        ref_id: str,
        chain_id: str,
        blob_chain_id: str,
        token: str | None,
        claim_key: str | None,
        release: bool,
    ) -> RefRecord:
        out = self._write(
            self._set_chain_script, "set chain", ref_id, token, claim_key, release, [chain_id, blob_chain_id]
        )
        return _record(out[1:])

    def _damaged(self, ref_id: str, digest: str, mark: bool) -> RefRecord:
        what = "mark damaged" if mark else "clear damaged"
        out = self._write(self._damaged_script, what, ref_id, None, None, False, [digest, "1" if mark else "0"])
        return _record(out[1:])

    def _write(
        self,
        script: Any,
        what: str,
        ref_id: str,
        token: str | None,
        lkey: str | None,
        release: bool,
        args: list[str],
    ) -> list[Any]:
        keys = [self._ref(ref_id), claim_key(self.prefix, lkey if lkey is not None else ref_id)]
        with redis_errors(self.client, f"{what} for ref {ref_id}"):
            out = script(keys=keys, args=[token or "", "1" if release else "0", *args])
        status = _s(out[0])
        if status == "lease_lost":
            raise ClaimLost(
                f"{what} for ref {ref_id} refused: the claim is no longer held by this worker",
                ref=ref_id,
                lease_key=lkey if lkey is not None else ref_id,  # detail name kept: published output
            )
        if status == "not_found":
            raise RefNotFound(f"ref {ref_id} is not registered", ref=ref_id)
        return list(out)

    def list_refs(self) -> Iterator[RefRecord]:
        """Every registered ref, in ref id order."""
        with redis_errors(self.client, "list refs"):
            ids = sorted(_s(x) for x in self.client.sscan_iter(self._refs, count=1000))
        for i in range(0, len(ids), 500):
            batch = ids[i : i + 500]
            with redis_errors(self.client, "list refs"):
                pipe = self.client.pipeline(transaction=False)
                for ref_id in batch:
                    pipe.hgetall(self._ref(ref_id))
                rows = pipe.execute()
            for flat in rows:
                if flat:
                    yield _record([x for kv in flat.items() for x in kv])

    # --- manifests ----------------------------------------------------------------------------

    def _put_manifest(self, name: str, checked: list[str]) -> None:
        with redis_errors(self.client, f"put manifest {name}"):
            self.client.hset(self._manifests, name, json.dumps(checked))

    def manifest_digests(self) -> set[str]:
        with redis_errors(self.client, "read manifests"):
            vals = self.client.hvals(self._manifests)
        return {d for v in vals for d in json.loads(_s(v))}

    def __repr__(self) -> str:
        return f"RedisMetadataStore({describe_redis(self.client)!r}, prefix={self.prefix!r})"

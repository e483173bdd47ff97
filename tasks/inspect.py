"""The operator's view of a chain in distributed mode (``blobchain status``): for each ref of the
chain, its state, who holds its claim (worker and pid), the claim's time left, the attempts and
takeovers. Read-only; a few pipelined Redis reads per ref."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from blobchain.storage.claims.redis import RedisClaimService
from blobchain.storage.metadata import MetadataStore
from blobchain.storage.redis_util import redis_errors
from blobchain.workers.chainjob import chain_records

__all__ = ["RefStatus", "chain_status"]

DONE, RUNNING, HOLDER_LOST, IDLE = "done", "running", "holder-lost", "idle"


@dataclass(frozen=True)
class RefStatus:
    ref_id: str
    snapshot: str
    # done (blob recorded, nothing building) | running (a live claim) | holder-lost (the holder
    # died or was cut off: its claim expired unreleased; a janitor sends the task again within
    # one poll) | idle (no blob and nothing building: queued, waiting or never submitted)
    state: str
    variant: str | None = None
    holder: str | None = None  # the worker's node name
    pid: int | None = None
    lease_left_s: float | None = None
    # Starts of this ref's build that did not end normally: the running one and the crashed ones.
    attempts: int = 0
    takeovers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def chain_status(
    metadata: MetadataStore, claims: RedisClaimService, ref_id: str, prefix: str
) -> list[RefStatus]:
    """Each ref of ``ref_id``'s chain, base first, with its claim's holder and delivery."""
    records = chain_records(ref_id, metadata)
    client = claims.client
    with redis_errors(client, "read deliveries"):
        raw = client.hgetall(claims.deliveries_key)
    flights: dict[str, set[str]] = {}
    by_token: dict[str, dict[str, Any]] = {}
    for tok, body in raw.items():
        try:
            d = json.loads(_s(body))
        except ValueError:
            continue
        by_token[_s(tok)] = d
        key = str(d.get("key") or "")
        ref = key.split("#", 1)[0]
        flights.setdefault(ref, set()).add(key)
    out: list[RefStatus] = []
    for rec in records:
        row = RefStatus(rec.ref_id, rec.spec.snapshot, DONE if rec.blob is not None else IDLE)
        for flight in sorted(flights.get(rec.ref_id, ())):
            with redis_errors(client, f"read claim {flight}"):
                pipe = client.pipeline(transaction=False)
                pipe.get(claims.redis_key(flight))
                pipe.pttl(claims.redis_key(flight))
                pipe.hvals(f"{prefix}attempts:{flight}")
                pipe.get(f"{prefix}stats:takeovers:{flight}")
                token, ttl, attempts, takeovers = pipe.execute()
            variant = flight.split("#", 1)[1] if "#" in flight else None
            common: dict[str, Any] = {
                "variant": variant,
                "attempts": sum(int(_s(a)) for a in attempts or ()),
                "takeovers": int(_s(takeovers)) if takeovers is not None else 0,
            }
            holder = by_token.get(_s(token)) if token is not None else None
            if token is not None:
                row = RefStatus(
                    rec.ref_id,
                    rec.spec.snapshot,
                    RUNNING,
                    holder=(holder or {}).get("host"),
                    pid=(holder or {}).get("pid"),
                    lease_left_s=max(0, int(ttl)) / 1000,
                    **common,
                )
                break
            dead = [d for d in by_token.values() if d.get("key") == flight]
            if dead and row.state != RUNNING:
                d = dead[0]
                row = RefStatus(
                    rec.ref_id,
                    rec.spec.snapshot,
                    HOLDER_LOST if rec.blob is None else DONE,
                    holder=d.get("host"),
                    pid=d.get("pid"),
                    lease_left_s=0.0,
                    **common,
                )
        out.append(row)
    return out

"""Time budgets of distributed mode, derived from the settings; every component reads them here."""

from __future__ import annotations

from dataclasses import dataclass

from blobchain.config.settings import Settings

__all__ = ["Timing", "timing"]


@dataclass(frozen=True)
class Timing:
    soft_time_limit_s: int
    time_limit_s: int
    # Longest retry countdown (InProgress/Unavailable backoff cap): far below the visibility timeout.
    max_countdown_s: float
    # A delivered, unacked message is redelivered after this long: above hard limit + countdown.
    visibility_timeout_s: int
    soft_shutdown_s: float


# A stopping worker lets running layers finish this long before it requeues them (cold shutdown);
# orchestrators must allow a bit more (compose: stop_grace_period 40s).
SOFT_SHUTDOWN_S = 30.0


def timing(settings: Settings) -> Timing:
    hard = settings.time_limit_s
    soft = min(settings.soft_time_limit_s, max(1, hard - 1))
    countdown = float(min(30, max(1, hard // 4)))
    # Slack for a reserved message waiting for a free slot; proportional so that tests with tiny
    # limits get a short redelivery, capped for production limits.
    slack = min(600, max(5, hard // 2))
    return Timing(
        soft_time_limit_s=soft,
        time_limit_s=hard,
        max_countdown_s=countdown,
        visibility_timeout_s=int(hard + countdown + slack),
        soft_shutdown_s=min(SOFT_SHUTDOWN_S, float(soft)),
    )

"""Per-identity token-bucket rate limiting shared by all worker processes."""

from edge.ratelimit.base import LOCK_TIMEOUT, TABLE_FULL, Decision, RateLimiter, slot_digest
from edge.ratelimit.shm import DEFAULT_LOCK_TIMEOUT_S, SharedTable, ShmRateLimiter
from edge.ratelimit.table import Table, TableFormatError

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "LOCK_TIMEOUT",
    "TABLE_FULL",
    "Decision",
    "RateLimiter",
    "SharedTable",
    "ShmRateLimiter",
    "Table",
    "TableFormatError",
    "slot_digest",
]

"""When to renew and when to retry: pure decisions over dates.

Renewal (``[acme] renew_before``, in days): a certificate is renewed
``renew_before`` before it expires, but never in the first two thirds of
its lifetime, so a CA handing out short-lived certificates (six days, or
Pebble's test minutes) does not make us renew continuously: the window is
``min(renew_before, lifetime / 3)``, as Caddy and certbot do for short
lifetimes. When the CA offers ACME Renewal Information (RFC 9773) its
suggested time wins.

Retries: a failed issuance is retried after :data:`FIRST_RETRY`, doubling
each time up to :data:`MAX_RETRY`; a success resets the count. The CA's
failed-validation limits (Let's Encrypt: 5 per hour and name) are never
reached by this schedule.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Final

#: Seconds before the first retry after a failure, and the cap of the doubling.
FIRST_RETRY: Final = 60.0
MAX_RETRY: Final = 6 * 3600.0


@dataclass(frozen=True)
class Validity:
    """A stored certificate's dates and whether it covers every name of its host."""

    not_before: datetime.datetime
    not_after: datetime.datetime
    covers_names: bool = True


def renewal_time(
    validity: Validity,
    renew_before: datetime.timedelta,
    suggested: datetime.datetime | None = None,
) -> datetime.datetime:
    """When the certificate should be renewed.

    Args:
        validity: the stored certificate.
        renew_before: ``[acme] renew_before``.
        suggested: the CA's ARI suggestion, when it gave one.
    """
    if not validity.covers_names:
        # The host's names changed since issuance: renew now.
        return validity.not_before
    if suggested is not None:
        return min(suggested, validity.not_after)
    lifetime = validity.not_after - validity.not_before
    return validity.not_after - min(renew_before, lifetime / 3)


def retry_delay(failures: int, first: float = FIRST_RETRY, cap: float = MAX_RETRY) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 = the first)."""
    if failures <= 0:
        return 0.0
    return min(cap, first * 2.0 ** min(failures - 1, 64))


def next_attempt(
    now: datetime.datetime,
    validity: Validity | None,
    renew_before: datetime.timedelta,
    *,
    failures: int = 0,
    last_failure: datetime.datetime | None = None,
    suggested: datetime.datetime | None = None,
    first_retry: float = FIRST_RETRY,
) -> datetime.datetime:
    """When to next talk to the CA for this host (``now`` or earlier: at once).

    No certificate yet: at once, unless a failure's backoff is still running.
    Otherwise at the renewal time, or after the backoff if that is later.
    """
    due = now if validity is None else renewal_time(validity, renew_before, suggested)
    if failures and last_failure is not None:
        backoff = last_failure + datetime.timedelta(seconds=retry_delay(failures, first_retry))
        due = max(due, backoff)
    return due

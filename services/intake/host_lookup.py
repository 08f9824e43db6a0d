"""The DNS lookup of a webhook endpoint's host, with a deadline of its own (no heavier imports than the
standard library: a test runs it in a namespace with a name server of its own)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

DNS_TIMEOUT = 5.0  # seconds a lookup of an endpoint's host may take (a resolver's usual per-try timeout)


class EndpointRefused(ValueError):
    """The URL may not receive webhooks; the message says why."""


class LookupTimedOut(EndpointRefused):
    """The DNS lookup of the endpoint's host did not answer in time (retried like any failed attempt)."""


def resolve_host(host: str, within: float | None = None) -> list[str]:
    """The addresses `host` resolves to, looked up for at most `within` seconds (DNS_TIMEOUT): the system
    resolver (which reads /etc/hosts as every other client here does) has no deadline of its own that we
    set, and a name server that never answers would hold a lane, or a registration, as long as it liked."""
    within = DNS_TIMEOUT if within is None else within
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = lookup_within(host, within)
    except socket.gaierror as exc:
        raise EndpointRefused("the endpoint's host name does not resolve") from exc
    except UnicodeError as exc:  # the IDNA codec's: an empty label, or one longer than 63 characters
        raise EndpointRefused(
            "the endpoint's host name is not a DNS name (labels of 1 to 63 characters between dots)"
        ) from exc
    return sorted({str(info[4][0]) for info in infos})


# Lookups still running (a thread each), answered in time or not: past this many unanswered at once, a new
# one is refused at once rather than start yet another thread behind a resolver that does not answer.
_LOOKUPS = threading.BoundedSemaphore(32)


def lookup_within(host: str, within: float) -> list[Any]:
    """socket.getaddrinfo(host) on a thread of its own, waited for `within` seconds. A lookup that does not
    answer in time is left to end on its own (getaddrinfo cannot be cancelled); the caller goes on."""
    if not _LOOKUPS.acquire(blocking=False):
        raise LookupTimedOut(
            "DNS lookups of endpoint hosts are not answering (too many are still waiting); the attempt is "
            "retried, check that the endpoint's host name resolves"
        )
    answer: list[Any] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            answer.extend(socket.getaddrinfo(host, None))
        except BaseException as exc:  # handed to the caller, who waited for it
            failure.append(exc)
        finally:
            _LOOKUPS.release()
            done.set()

    threading.Thread(target=look_up, name="webhooks-dns", daemon=True).start()
    if not done.wait(within):
        raise LookupTimedOut(
            f"the DNS lookup of the endpoint's host did not answer within {within:g} s; the attempt is "
            "retried, check the name servers of the host's domain"
        )
    if failure:
        raise failure[0]
    return answer

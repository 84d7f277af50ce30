"""Signed webhooks: ``X-HDM-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, retried with
exponential backoff. Deliveries live in the DB (survive restarts) and are sent by their own thread, never inside
the maintenance tick.

Targets: ``scheme://host:port`` entries of HDM_WEBHOOK_ALLOW_HOSTS, or (with HDM_WEBHOOK_ALLOW_PUBLIC) any target
whose addresses are all public. The address is resolved and checked when sending and the request goes to that
checked address (a DNS answer that changes in between cannot point it inside); redirects are never followed."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import session_scope, utcnow
from app.errors import Invalid
from app.models import Job, WebhookDelivery
from app.services import presenter
from app.settings import get_settings

log = logging.getLogger(__name__)


DEFAULT_PORTS = {"http": 80, "https": 443}
Target = tuple[str, str, int]  # scheme, host (lower case, IPv6 without brackets), port


class WebhookRefused(ValueError):
    pass


def target(url: str) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise WebhookRefused("webhook must be an http(s) URL with a host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise WebhookRefused(f"bad port: {exc}") from None
    return scheme, parts.hostname.lower(), port


def allow_list(entries: str | None = None) -> set[Target]:
    """HDM_WEBHOOK_ALLOW_HOSTS parsed; a bare host (the old host-only form) is an error: scheme and port count."""
    raw = get_settings().webhook_allow_hosts if entries is None else entries
    out = set()
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        if "://" not in entry:
            raise ValueError(f"HDM_WEBHOOK_ALLOW_HOSTS entry {entry!r} must be scheme://host[:port]")
        out.add(target(entry))
    return out


def public_ip(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _literal_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_url(url: str | None) -> None:
    """At submission: allow-listed, or (public mode) a public IP literal or a name (its address is checked when
    the delivery is sent)."""
    if not url:
        return
    settings = get_settings()
    try:
        t = target(url)
        if t in allow_list():
            return
        if not settings.webhook_allow_public:
            raise WebhookRefused(
                f"{t[0]}://{t[1]}:{t[2]} is not on the server's allow-list "
                "(HDM_WEBHOOK_ALLOW_HOSTS, scheme://host:port)"
            )
        if t[1] == "localhost" or t[1].endswith(".localhost") or (_literal_ip(t[1]) and not public_ip(t[1])):
            raise WebhookRefused("webhook targets a loopback/private address; only allow-listed ones may")
    except WebhookRefused as exc:
        raise Invalid(f"{exc}.", param="webhook", code="webhook_host_not_allowed") from None


def pinned_address(url: str) -> str | None:
    """When sending: None for an allow-listed target (connect as named), else the one public address to connect
    to. Raises WebhookRefused when any address of the name is not public."""
    t = target(url)
    if t in allow_list():
        return None
    if not get_settings().webhook_allow_public:
        raise WebhookRefused("host not on the allow-list")
    try:
        infos = socket.getaddrinfo(t[1], t[2], type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(f"cannot resolve {t[1]}: {exc}") from None
    addrs = sorted({str(info[4][0]) for info in infos})
    bad = [a for a in addrs if not public_ip(a)]
    if not addrs or bad:
        raise WebhookRefused(f"{t[1]} resolves to a non-public address ({', '.join(bad) or 'none'})")
    return addrs[0]


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> httpx.Response:
    pin = pinned_address(url)
    extensions: dict[str, Any] = {}
    if pin is not None:  # connect to the checked address; Host and TLS name stay the URL's
        parts = urlsplit(url)
        scheme, host, port = target(url)
        headers = {**headers, "Host": parts.netloc.rpartition("@")[2]}
        ip = f"[{pin}]" if ":" in pin else pin
        url = parts._replace(netloc=f"{ip}:{port}").geturl()
        if scheme == "https":
            extensions["sni_hostname"] = host
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        return client.request("POST", url, content=body, headers=headers, extensions=extensions)


def sign(body: bytes, timestamp: int, secret: str | None = None) -> str:
    key = (secret if secret is not None else get_settings().webhook_secret).encode()
    mac = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(body: bytes, header: str, secret: str, tolerance_s: int = 300) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(body, ts, secret), f"t={ts},v1={parts.get('v1', '')}")


def deliver_due(session: Session, limit: int = 20) -> int:
    """Attempt every due delivery once; returns how many were attempted."""
    settings = get_settings()
    now = utcnow()
    due = list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .limit(limit)
        )
    )
    done = 0
    for d in due:
        lease_until = utcnow() + timedelta(seconds=settings.webhook_timeout_s + 30)
        res = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == d.id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(status="sending", next_attempt_at=lease_until)
        )
        session.commit()
        if res.rowcount != 1:  # type: ignore[attr-defined]
            continue  # another runner took it
        done += 1
        _attempt(session, d.id)
    # deliveries stuck in "sending" (runner died) become pending again
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.status == "sending", WebhookDelivery.next_attempt_at < now)
        .values(status="pending")
    )
    session.commit()
    return done


def _attempt(session: Session, delivery_id: int) -> None:
    settings = get_settings()
    d = session.get(WebhookDelivery, delivery_id)
    assert d is not None
    job = session.get(Job, d.job_id)
    attempts = d.attempts + 1
    error: str | None = None
    if job is None:
        error = "job deleted"
    else:
        body = json.dumps(presenter.job_body(session, job), separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "X-HDM-Signature": sign(body, int(time.time())),
            "X-HDM-Event": f"job.{job.status}",
            "X-HDM-Delivery": str(d.id),
            "User-Agent": "hdm-serve",
        }
        try:
            r = _post(d.url, body, headers, settings.webhook_timeout_s)
            if not 200 <= r.status_code < 300:  # a 3xx is not followed: a failed attempt
                error = f"HTTP {r.status_code}"
        except WebhookRefused as exc:
            error, attempts = f"refused: {exc}", settings.webhook_max_attempts
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
    d.attempts = attempts
    if error is None:
        d.status, d.last_error = "delivered", None
        log.info("webhook %s for %s delivered (attempt %d)", d.id, d.job_id, attempts)
    elif attempts >= settings.webhook_max_attempts:
        d.status, d.last_error = "failed", error
        log.warning("webhook %s for %s failed for good: %s", d.id, d.job_id, error)
    else:
        d.status, d.last_error = "pending", error
        d.next_attempt_at = utcnow() + timedelta(seconds=settings.webhook_backoff_s * 2 ** (attempts - 1))
        log.info("webhook %s for %s: %s; retry %d", d.id, d.job_id, error, attempts)
    session.commit()


class DeliveryThread(threading.Thread):
    """Sends due deliveries on its own schedule: a slow receiver (up to limit x timeout per round) never delays
    the maintenance tick (stale-job recovery, scheduling)."""

    def __init__(self, interval_s: float | None = None) -> None:
        super().__init__(name="hdm-webhooks", daemon=True)
        self.interval_s = interval_s or get_settings().maintenance_interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                with session_scope() as session:
                    deliver_due(session)
            except Exception:
                log.exception("webhook deliveries failed")
            self.stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self.stop_event.set()

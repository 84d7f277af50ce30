"""Signed webhooks: ``X-HDM-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, retried with
exponential backoff, only to hosts on the allow-list. Deliveries live in the DB (survive restarts)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Invalid
from app.models import Job, WebhookDelivery
from app.services import presenter
from app.settings import get_settings

log = logging.getLogger(__name__)


def host_allowed(url: str) -> bool:
    hosts = get_settings().webhook_hosts
    host = (urlsplit(url).hostname or "").lower()
    return "*" in hosts or host in hosts


def check_url(url: str | None) -> None:
    if url and not host_allowed(url):
        raise Invalid(
            "webhook host is not on the server's allow-list (HDM_WEBHOOK_ALLOW_HOSTS).",
            param="webhook",
            code="webhook_host_not_allowed",
        )


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
    elif not host_allowed(d.url):
        error = "host not on the allow-list"
        attempts = settings.webhook_max_attempts
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
            r = httpx.post(
                d.url,
                content=body,
                headers=headers,
                timeout=settings.webhook_timeout_s,
                follow_redirects=False,
            )
            if not 200 <= r.status_code < 300:
                error = f"HTTP {r.status_code}"
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

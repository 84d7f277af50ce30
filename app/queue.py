"""Enqueue work by task name (the API never imports the task code, nor torch).

Celery mode (``redis://`` broker): publish to the job's queue via the default exchange (routing key = queue name), so
a broker that lost its state (FLUSHALL) still routes. Embedded mode (``db://``): the jobs table is the queue.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu import Queue

from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_IMAGE = "hdm.image"
TASK_TRAIN = "hdm.train"
TASK_DATASET = "hdm.dataset"
TASK_MERGE = "hdm.merge"
TASK_TRAIN_NODE = "hdm.train_node"  # a further node's part of a multi-node train job (app/services/nodes.py)
TASKS = {"image": TASK_IMAGE, "train": TASK_TRAIN, "dataset": TASK_DATASET, "merge": TASK_MERGE}
FINAL = ("succeeded", "failed", "cancelled")


def make_celery(settings: Settings) -> Celery:
    app = Celery("hdm", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.image_queue,
        task_queues=[Queue(q, routing_key=q) for q in settings.all_queues],
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


@functools.cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def task_id(job_id: str, enqueue_count: int) -> str:
    return f"{job_id}.{enqueue_count}"


def publish(kind: str, job_id: str, queue: str, enqueue_count: int, countdown: float | None = None) -> None:
    settings = get_settings()
    if settings.embedded:
        return
    get_celery().send_task(
        TASKS[kind],
        args=[job_id],
        task_id=task_id(job_id, enqueue_count),
        queue=queue,
        exchange="",
        routing_key=queue,
        countdown=countdown,
    )


def publish_node(job_id: str, rank: int, queue: str, enqueue_count: int) -> None:
    """Tell the trainer of a multi-node job's node ``rank`` to start its part (one message per node and start)."""
    settings = get_settings()
    if settings.embedded:
        return
    get_celery().send_task(
        TASK_TRAIN_NODE,
        args=[job_id, rank],
        task_id=f"{task_id(job_id, enqueue_count)}.node{rank}",
        queue=queue,
        exchange="",
        routing_key=queue,
    )


@dataclass(frozen=True)
class BrokerView:
    """What the Redis broker holds, by job id: ``waiting`` have a message in a queue or one delivered recently;
    ``stuck`` have only messages delivered more than ``stuck_after_s`` ago and never acknowledged (delivery tags)."""

    waiting: set[str] = field(default_factory=set)
    stuck: dict[str, list[str]] = field(default_factory=dict)


def _job_id(message: Any) -> str | None:
    """The job a message starts; None for a further node's part (publish_node), which starts no job."""
    try:
        tid = str(message["headers"]["id"])
    except (KeyError, TypeError):
        return None
    return None if ".node" in tid else tid.split(".", 1)[0]


def broker_view(settings: Settings, stuck_after_s: float) -> BrokerView | None:
    """Scan the broker's queues and its ``unacked`` hash; None if it cannot be read.

    A worker takes a message it can run and claims the job at once, so a queued job's message stays delivered but
    unacknowledged only while it waits out a bounce countdown (seconds) or behind a busy worker's running task. One
    older than ``stuck_after_s`` most likely belongs to a worker that died: kombu would hand it out again only
    after the visibility timeout (hours). Publishing such a job again at worst duplicates a message; the claim in
    the database is atomic, so the job still runs once."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    view = BrokerView()
    try:
        r = _redis(settings)
        for q in settings.all_queues:
            for key in r.scan_iter(match=f"{q}*", count=100):
                if r.type(key) == b"list":
                    for raw in r.lrange(key, 0, -1):
                        with contextlib.suppress(ValueError):
                            if (jid := _job_id(json.loads(raw))) is not None:
                                view.waiting.add(jid)
        delivered = dict(r.zrange("unacked_index", 0, -1, withscores=True))
        old = time.time() - stuck_after_s
        # countdown (ETA) messages wait inside the worker, not in the list: they are in "unacked" too.
        for tag, raw in r.hgetall("unacked").items():
            try:
                jid = _job_id(json.loads(raw)[0])
            except (ValueError, IndexError, TypeError):
                continue
            if jid is None:
                continue
            if delivered.get(tag, time.time()) < old:
                view.stuck.setdefault(jid, []).append(tag.decode())
            else:
                view.waiting.add(jid)
    except Exception as exc:  # broker down: nothing can be decided
        log.warning("broker scan failed: %s", exc)
        return None
    return view


def drop_unacked(settings: Settings, tags: list[str]) -> int:
    """Forget messages a dead worker held (so kombu does not hand them out again hours later); returns how many
    were still there."""
    if not tags:
        return 0
    r = _redis(settings)
    with r.pipeline() as pipe:
        for tag in tags:
            pipe.zrem("unacked_index", tag).hdel("unacked", tag)
        res = pipe.execute()
    return sum(int(x) for x in res[1::2])


def _redis(settings: Settings):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_timeout=5)


def _marker(settings: Settings) -> str:
    return f"{settings.queue_prefix}:broker-marker"


def marker_present(settings: Settings) -> bool:
    """False when the broker lost its state (FLUSHALL, a fresh Redis): time to reconcile with the DB."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return True
    try:
        return bool(_redis(settings).exists(_marker(settings)))
    except Exception:
        return True  # broker down: nothing to do until it is back


def set_marker(settings: Settings) -> None:
    if settings.broker_url.startswith(("redis://", "rediss://")):
        with contextlib.suppress(Exception):
            _redis(settings).set(_marker(settings), "1")


def broker_ok(settings: Settings) -> bool:
    if settings.embedded:
        return True
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False

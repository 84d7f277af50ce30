"""Prometheus metrics of the API process, with prometheus-client: request latency per route template, and the
job table's gauges read at scrape time (the database, not the broker, is the truth about queues).

Job run times, queue waits and the GPU-side numbers come from the workers' own endpoints (worker/metrics.py);
docs/deployment.md ("Metrics") lists every target and docs/prometheus.yml is an example scrape config."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
KINDS = ("image", "train", "dataset", "merge")
# Most routes answer in milliseconds; uploads and the image edit route take longer (tens of MB of base64).
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    """One per application (its own registry, so two apps in one process, as in tests, never share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hdm_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hdm_http_request_duration_seconds",
            "Time to serve a request, by method and route template.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self, job_counts: dict[tuple[str, str], int]) -> bytes:
        """The exposition text: this registry plus the job table's gauges from ``job_counts`` ((kind, status) ->
        jobs), built fresh per scrape so a deleted job leaves no stale series."""
        jobs = CollectorRegistry()
        by_status = Gauge("hdm_jobs", "Jobs by kind and status.", ["kind", "status"], registry=jobs)
        depth = Gauge("hdm_queue_depth", "Queued jobs by kind.", ["kind"], registry=jobs)
        running = Gauge("hdm_jobs_running", "Running jobs by kind.", ["kind"], registry=jobs)
        for (kind, status), n in sorted(job_counts.items()):
            by_status.labels(kind, status).set(n)
        for kind in sorted({*KINDS, *(k for k, _ in job_counts)}):
            depth.labels(kind).set(job_counts.get((kind, "queued"), 0))
            running.labels(kind).set(job_counts.get((kind, "running"), 0))
        return generate_latest(self.registry) + generate_latest(jobs)

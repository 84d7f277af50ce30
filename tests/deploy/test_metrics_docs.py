"""docs/prometheus.yml and docs/grafana-dashboard.json use only metrics the code defines (app/metrics.py for the
API, worker/metrics.py for the workers), with labels those metrics have, and scrape what docker-compose.yml runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import ApiMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
SCRAPE = ROOT / "docs" / "prometheus.yml"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
PROMQL_WORDS = {"by", "le", "instance", "job"}  # grouping keyword; labels every histogram / target has


def defined() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric the API and the workers define."""
    from worker.metrics import WorkerMetrics

    api = ApiMetrics()
    families = list(text_string_to_metric_families(api.render({("image", "queued"): 1}).decode()))
    worker = WorkerMetrics(CollectorRegistry())  # a registry of the test's own
    out: dict[str, set[str]] = {}
    for fam in families:
        labels = {k for s in fam.samples for k in s.labels}
        for suffix in SUFFIXES[fam.type]:
            out[fam.name + suffix] = labels
    for metric in (m for obj in (api, worker) for m in vars(obj).values() if hasattr(m, "_labelnames")):
        name, kind = metric._name, metric._type
        for suffix in SUFFIXES[kind]:
            out[name + suffix] = set(metric._labelnames)
    return out


def exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_uses_only_defined_metrics_and_labels() -> None:
    known = defined()
    assert "hdm_http_request_duration_seconds_bucket" in known and "hdm_job_run_seconds_bucket" in known
    used = set()
    for expr in exprs():
        names = set(re.findall(r"\bhdm_[a-z_]+\b", expr))
        assert names, expr
        unknown = names - known.keys()
        assert not unknown, f"{expr}: {unknown} not defined by app/metrics.py or worker/metrics.py"
        labels = set(re.findall(r"by \(([^)]*)\)", expr)) | set(re.findall(r"\{\{(\w+)\}\}", expr))
        wanted = {w.strip() for group in labels for w in group.split(",")} - PROMQL_WORDS
        have = set().union(*(known[n] for n in names))
        assert wanted <= have, f"{expr}: labels {wanted - have} not on {names}"
        used |= names
    # every family the code defines is on the dashboard (a new metric gets a panel)
    families = {re.sub(r"(_total|_bucket|_count|_sum)$", "", n) for n in known}
    shown = {re.sub(r"(_total|_bucket|_count|_sum)$", "", n) for n in used}
    assert families - shown <= {"hdm_jobs"}, families - shown  # hdm_jobs: by status, for ad-hoc queries


def test_legends_name_labels_the_metrics_have() -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = defined()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            names = set(re.findall(r"\bhdm_[a-z_]+\b", t["expr"]))
            legend = set(re.findall(r"\{\{(\w+)\}\}", t["legendFormat"])) - PROMQL_WORDS
            grouped = re.findall(r"by \(([^)]*)\)", t["expr"])
            have = (
                {w.strip() for g in grouped for w in g.split(",")}
                if grouped
                else set().union(*(known[n] for n in names))
            )
            assert legend <= have, (panel["title"], legend, have)


def test_scrape_config_targets_what_compose_runs() -> None:
    scrape = yaml.safe_load(SCRAPE.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    api = [t for c in jobs["hdm-api"]["static_configs"] for t in c["targets"]]
    assert api == ["api:8000"] and services["api"]["ports"][0].endswith(":8000")
    workers = [t for c in jobs["hdm-workers"]["static_configs"] for t in c["targets"]]
    port = compose["x-hdm-env"]["HDM_WORKER_METRICS_PORT"]
    gpu_services = {n for n, s in services.items() if "worker" in " ".join(map(str, s.get("command", [])))}
    assert {t.split(":")[0] for t in workers} == gpu_services
    assert {t.split(":")[1] for t in workers} == {port}
    for name in gpu_services:
        assert services[name]["expose"] == [port] and "ports" not in services[name], name

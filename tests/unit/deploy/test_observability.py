"""deploy/grafana and deploy/prometheus against the metrics the services really export.

Every metric the dashboard's queries and the alert rules name must exist in
services.common.metrics (no dead panel, no alert that can never fire); the JSON and the
rules parse; promtool checks the scrape config and the rules, and runs unit tests of the
alerts on synthetic series. promtool comes from Debian's `prometheus` package: the tests
that need it skip without it, except in CI (CI=true), where a missing promtool fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.common import metrics

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "neurodissect.json"
CHART_DASHBOARD = ROOT / "deploy" / "helm" / "neurodissect" / "dashboards" / "neurodissect.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC_NAME = re.compile(r"\bneurodissect_[a-z_]+")
# Grafana's variables, replaced by plain values to make each panel's query bare PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$job_id": ".*", "$service": ".*"}


def exported_families() -> dict[str, str]:
    """Metric family name → type, for every metric services.common.metrics defines."""
    families = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                families[family.name] = family.type
    return families


def exported_series() -> dict[str, str]:
    """Every series name a scrape can return → the family it belongs to."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {name + suffix: name
            for name, kind in exported_families().items() for suffix in suffixes[kind]}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
            for panel in panels(dashboard) for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def unknown_metrics(expr: str) -> list[str]:
    series = exported_series()
    return [name for name in METRIC_NAME.findall(expr) if name not in series]


# ----------------------------------------------------------------------------- dashboard


def test_dashboard_parses_and_is_the_charts_copy() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "neurodissect"
    # One source of truth: deploy/grafana/neurodissect.json is the chart's file.
    assert DASHBOARD.read_bytes() == CHART_DASHBOARD.read_bytes()
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_every_dashboard_query_names_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queries += [(f"variable {v}", v) for v in variables]
    dead = {where: unknown_metrics(expr) for where, expr in queries}
    assert {where: names for where, names in dead.items() if names} == {}


def test_dashboard_variables_are_defined() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = {name for _, expr in dashboard_queries() for name in re.findall(r"\$(\w+)", expr)}
    assert used - {"__rate_interval", "__range"} <= defined
    datasources = {json.dumps(p["datasource"]) for p in panels(dashboard) if "datasource" in p}
    assert datasources == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}


def test_dashboard_covers_every_exported_metric() -> None:
    """The dashboard is built from exactly the exported names: each family has a panel."""
    series = exported_series()
    shown = {series[name] for _, expr in dashboard_queries() for name in METRIC_NAME.findall(expr)
             if name in series}
    assert shown == set(exported_families())


def test_histogram_quantiles_use_buckets_by_le() -> None:
    for where, expr in dashboard_queries():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "le" in re.findall(r"by \(([^)]*)\)", expr)[0], where


# ----------------------------------------------------------------------------- alerts


def test_alert_rules_parse_and_name_exported_metrics() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {"NeurodissectJobStalled", "NeurodissectRPCErrors", "NeurodissectServiceDown"} <= names
    for rule in rules:
        assert rule["annotations"]["summary"] and rule["labels"]["severity"], rule["alert"]
        assert unknown_metrics(rule["expr"]) == [], rule["alert"]
    stalled = next(r for r in rules if r["alert"] == "NeurodissectJobStalled")
    assert "neurodissect_job_last_progress_timestamp_seconds" in stalled["expr"]
    down = next(r for r in rules if r["alert"] == "NeurodissectServiceDown")
    assert re.search(r"\bup\b.*== 0", down["expr"])


def test_crude_metric_regex_catches_a_dead_name() -> None:
    assert unknown_metrics("rate(neurodissect_units_explained_total[5m])") == []
    dead = "neurodissect_units_explained"  # the counter without its _total
    assert unknown_metrics(f"rate({dead}[5m])") == [dead]
    assert unknown_metrics("neurodissect_jobs_total") == ["neurodissect_jobs_total"]


# ----------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian package `prometheus`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must install it")
        pytest.skip(message)
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    result = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                            timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_the_scrape_config(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert "1 rule files found" in output
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"localhost:{port}" for port in range(9101, 9105)}
    assert job["job_name"] == "neurodissect"


def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", ALERTS)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables filled in, is valid PromQL."""
    rules = []
    for number, (_, expr) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", path)


def alert(name: str, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    return {"exp_labels": {"alertname": name, **labels}, "exp_annotations": annotations}


ALERT_TESTS = {
    "rule_files": [str(ALERTS)],
    "evaluation_interval": "1m",
    "tests": [
        {   # j1 stopped progressing at t=0; j2 progresses every minute.
            "interval": "1m",
            "input_series": [
                {"series": 'neurodissect_job_last_progress_timestamp_seconds{job="neurodissect",'
                           'instance="localhost:9101",service="gateway",job_id="j1"}',
                 "values": "0x30"},
                {"series": 'neurodissect_job_last_progress_timestamp_seconds{job="neurodissect",'
                           'instance="localhost:9101",service="gateway",job_id="j2"}',
                 "values": "0+60x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "NeurodissectJobStalled", "exp_alerts": []},
                {"eval_time": "17m", "alertname": "NeurodissectJobStalled", "exp_alerts": [
                    alert("NeurodissectJobStalled", {"job_id": "j1", "severity": "warning"}, {
                        "summary": "neurodissect job j1 stalled",
                        "description": "Job j1 has made no progress for 17m 0s.",
                    })]},
            ],
        },
        {   # The extractor stops answering scrapes at t=2m.
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="neurodissect",instance="localhost:9101",service="gateway"}',
                 "values": "1x10"},
                {"series": 'up{job="neurodissect",instance="localhost:9102",service="extractor"}',
                 "values": "1 1 0x8"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "NeurodissectServiceDown", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "NeurodissectServiceDown", "exp_alerts": [
                    alert("NeurodissectServiceDown", {
                        "job": "neurodissect", "instance": "localhost:9102", "service": "extractor",
                        "severity": "critical"}, {
                        "summary": "neurodissect extractor is down",
                        "description": "Prometheus cannot scrape localhost:9102 (extractor) "
                                       "for 2 minutes.",
                    })]},
            ],
        },
        {   # The gateway fails 10% of its calls with INTERNAL; the extractor's many
            # INVALID_ARGUMENT answers are users' mistakes, not an outage.
            "interval": "1m",
            "input_series": [
                {"series": 'neurodissect_rpc_requests_total{job="neurodissect",service="gateway",'
                           'method="GetJob",code="OK"}', "values": "0+90x30"},
                {"series": 'neurodissect_rpc_requests_total{job="neurodissect",service="gateway",'
                           'method="GetJob",code="INTERNAL"}', "values": "0+10x30"},
                {"series": 'neurodissect_rpc_requests_total{job="neurodissect",service="extractor",'
                           'method="Extract",code="OK"}', "values": "0+10x30"},
                {"series": 'neurodissect_rpc_requests_total{job="neurodissect",service="extractor",'
                           'method="Extract",code="INVALID_ARGUMENT"}', "values": "0+90x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "NeurodissectRPCErrors", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "NeurodissectRPCErrors", "exp_alerts": [
                    alert("NeurodissectRPCErrors", {"service": "gateway", "severity": "warning"}, {
                        "summary": "neurodissect gateway: RPC errors",
                        "description": "10% of the gateway RPCs failed with a server error "
                                       "over the last 5 minutes.",
                    })]},
            ],
        },
    ],
}


def test_promtool_alert_unit_tests(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(ALERT_TESTS, sort_keys=False))
    output = run_promtool(promtool, "test", "rules", path)
    assert "SUCCESS" in output

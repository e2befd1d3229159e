"""Every Prometheus metric the services export, defined in one place.

Names follow Prometheus conventions: base units, `_total` for counters, `_seconds`
for durations. Labels never carry unit ids. deploy/grafana and deploy/prometheus
query exactly these names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "neurodissect_rpc_requests_total",
    "gRPC requests handled, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "neurodissect_rpc_duration_seconds",
    "gRPC handling time (whole stream for streaming methods).",
    ["service", "method"],
    buckets=(0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300, 1800, 7200),
)
IMAGES_EXTRACTED = Counter(
    "neurodissect_images_extracted_total",
    "Probe images passed through a model by the extractor.",
)
BAD_IMAGES = Counter(
    "neurodissect_bad_images_total",
    "Probe images skipped because they could not be read.",
)
UNITS_EXPLAINED = Counter(
    "neurodissect_units_explained_total",
    "Units explained by the explainer, by method.",
    ["method"],
)
UNITS_CAPTIONED = Counter(
    "neurodissect_units_captioned_total",
    "Units captioned by the captioner.",
)
JOB_PROGRESS = Gauge(
    "neurodissect_job_progress_ratio",
    "Fraction of a job's current stage that is done (0 to 1).",
    ["job_id", "stage"],
)
JOB_ETA = Gauge(
    "neurodissect_job_eta_seconds",
    "Estimated seconds until a running job finishes its current stage.",
    ["job_id"],
)
JOB_LAST_PROGRESS = Gauge(
    "neurodissect_job_last_progress_timestamp_seconds",
    "Unix time of the last progress a running job made.",
    ["job_id"],
)
JOBS = Gauge(
    "neurodissect_jobs",
    "Jobs known to the gateway, by state.",
    ["state"],
)
QUEUE_LENGTH = Gauge(
    "neurodissect_queue_length",
    "Jobs waiting for a free slot.",
)
RAY_TASK_RETRIES = Counter(
    "neurodissect_ray_task_retries_total",
    "Ray block tasks that were retried after a failure.",
)
RAY_TASK_FAILURES = Counter(
    "neurodissect_ray_task_failures_total",
    "Ray block tasks that failed for good.",
)
STORE_BYTES = Counter(
    "neurodissect_store_bytes_total",
    "Bytes moved to or from the object store.",
    ["operation"],
)
STORE_OPERATIONS = Counter(
    "neurodissect_store_operations_total",
    "Object store operations.",
    ["operation"],
)
STORE_ERRORS = Counter(
    "neurodissect_store_errors_total",
    "Object store operations that failed.",
    ["operation"],
)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics over HTTP on `port` (0 disables)."""
    if port:
        start_http_server(port, addr=host)

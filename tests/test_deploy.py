"""The deploy files, checked as far as a machine without a Docker engine can.

* docker-compose.yml parses, has the six services, and every command it runs exists here
  (console scripts of pyproject.toml, `ndot` sub-commands, client flags, NDOT_* settings).
* Dockerfile copies only what exists and .dockerignore keeps; its command is a console script.
* deploy/prometheus.yml passes `promtool check config` (Debian package `prometheus`) when promtool
  is installed, else a structural check; its targets are the compose services' ports.
* The Grafana dashboard's queries parse as PromQL (`promtool check rules`, when installed) and name
  only metrics that service/metrics.py registers (read from its prometheus_client registry).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/ndot.json").read_text())
PROMETHEUS = REPO / "deploy/prometheus.yml"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
IMAGE = "ndot-stream:latest"


def own_image_services() -> dict[str, dict]:
    return {name: spec for name, spec in SERVICES.items() if spec.get("image") == IMAGE}


def dashboard_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in DASHBOARD["panels"] for target in panel["targets"]]


def registered_sample_names() -> set[str]:
    """Every sample name the service's metrics registry exposes (with _total, _bucket, ... suffixes)."""
    from service.metrics import ServiceMetrics

    registry = ServiceMetrics().registry
    return {sample.name for family in registry.collect() for sample in family.samples}


# ---------------------------------------------------------------- compose and Dockerfile


def test_compose_has_the_stack_and_builds_one_image() -> None:
    assert set(SERVICES) == {"redis", "api", "worker", "workers", "client", "prometheus", "grafana"}
    assert set(own_image_services()) == {"api", "worker", "workers", "client"}
    assert SERVICES["workers"]["profiles"] == ["ranks"]  # worker ranks only when asked for
    for spec in own_image_services().values():
        assert spec["build"]["context"] == "."
        assert spec["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert (REPO / "Dockerfile").is_file()


def test_compose_commands_are_console_scripts_with_real_subcommands_and_flags() -> None:
    from clients.dvs_client import build_parser

    commands = {name: spec["command"] for name, spec in own_image_services().items()}
    assert commands["api"] == ["ndot", "api"] and commands["worker"] == ["ndot", "worker"]
    for command in commands.values():
        assert command[0] in SCRIPTS, f"{command[0]} is not a console script of pyproject.toml"
    assert commands["workers"][:2] == ["ndot", "workers"]
    for sub in ("api", "worker", "serve", "workers"):
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", sub, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"ndot {sub} --help failed:\n{done.stderr[-2000:]}"
    client_args = build_parser().parse_args(commands["client"][1:])
    assert client_args.synthetic and client_args.url == "http://api:8000"


def test_compose_environment_names_are_settings() -> None:
    from service.settings import Settings

    known = {f"NDOT_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
    for name, spec in own_image_services().items():
        for variable in spec.get("environment", {}):
            assert variable in known, f"{name}: {variable} is not a field of service.settings.Settings"
    assert SERVICES["api"]["environment"]["REDIS_URL"].startswith("redis://redis:6379")


def test_compose_bind_mounts_exist() -> None:
    for name, spec in SERVICES.items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in COMPOSE["volumes"], f"{name} uses undeclared volume {source}"


def test_dockerfile_copies_existing_unignored_paths_and_runs_a_console_script() -> None:
    text = (REPO / "Dockerfile").read_text()
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
    sources = [src for line in copies for src in line.split()[:-1]]
    assert {"pyproject.toml", "README.md", "ndot_core", "service", "clients"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists() and source not in ignored, source
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, flags=re.MULTILINE)
    assert (
        "torch==${TORCH_VERSION}" in text
        and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    )
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, flags=re.MULTILINE).group(1))
    assert command[0] in SCRIPTS


# ---------------------------------------------------------------- Prometheus


def test_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is not None:
        done = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(PROMETHEUS.read_text())  # the structure, with or without promtool
    assert re.fullmatch(r"\d+[smh]", config["global"]["scrape_interval"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"])
    for job in jobs.values():
        for static in job["static_configs"]:
            assert all(re.fullmatch(r"[a-z0-9.-]+:\d+", target) for target in static["targets"])
    assert {"ndot-api", "ndot-worker"} <= set(jobs)


def test_prometheus_targets_are_the_compose_services_metrics_ports() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["ndot-api"] == [f"api:{SERVICES['api']['environment']['NDOT_PORT']}"]
    assert targets["ndot-worker"] == [
        f"worker:{SERVICES['worker']['environment']['NDOT_WORKER_METRICS_PORT']}"
    ]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in SERVICES["prometheus"]["volumes"]


# ---------------------------------------------------------------- Grafana


def test_dashboard_has_the_required_panels() -> None:
    titles = {panel["title"] for panel in DASHBOARD["panels"]}
    assert {
        "Online accuracy",
        "Events / s",
        "Step latency p50 / p99",
        "Memory",
        "Active streams",
        "Bus lag",
    } <= titles
    latency = next(p for p in DASHBOARD["panels"] if p["title"] == "Step latency p50 / p99")
    exprs = " ".join(target["expr"] for target in latency["targets"])
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    assert len({panel["id"] for panel in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_dashboard_queries_name_only_registered_metrics() -> None:
    registered = registered_sample_names() | {"ALERTS"}  # Prometheus' series of alert states (alerts.yml)
    assert "process_resident_memory_bytes" in registered
    for title, expr in dashboard_queries():
        names = set(re.findall(r"\b(?:ndot|process)_[a-z0-9_]+|\bALERTS\b", expr))
        assert names, f"{title}: {expr!r} names no metric"
        unknown = names - registered
        assert not unknown, f"{title}: {expr!r} names {sorted(unknown)}, not in service/metrics.py"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`): PromQL syntax unchecked")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_points_at_the_stack() -> None:
    sources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {panel["datasource"]["uid"] for panel in DASHBOARD["panels"]}
    assert uids == {source["uid"]}
    providers = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/ndot.yml").read_text())
    dashboards_path = providers["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{dashboards_path}:ro" in SERVICES["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in SERVICES["grafana"]["volumes"]

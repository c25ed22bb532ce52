"""The alert rules (deploy/prometheus/alerts.yml): valid, unit-tested with `promtool test rules`
(deploy/prometheus/alerts_test.yml) both ways for every alert, naming only metrics the service
registers, loaded by the Prometheus config and the compose stack, shown on the Grafana dashboard.

promtool comes from Debian's `prometheus` package (.ci/run installs it); without it the promtool
tests skip with a reason and the structural ones still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy/prometheus/alerts.yml"
RULE_TESTS = REPO / "deploy/prometheus/alerts_test.yml"
PROMETHEUS = REPO / "deploy/prometheus.yml"
EXPECTED_ALERTS = {
    "NdotAccuracyDrift",
    "NdotPrequentialAccuracyDrift",
    "NdotNoStepsWhilePacketsArrive",
    "NdotBusLagGrowing",
    "NdotWorkerHeartbeatStale",
    "NdotDeadLetters",
    "NdotMemoryHigh",
    "NdotMemoryGrowing",
}
#: Series Prometheus makes itself (not in the service's registry).
PROMETHEUS_SERIES = {"ALERTS", "up"}


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`, .ci/run installs it)")
    return path


def run_rule_tests(tool: str, rules_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"], cwd=rules_dir, capture_output=True, text=True, timeout=120
    )


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(EXPECTED_ALERTS)} rules found" in checked.stdout
    tested = run_rule_tests(tool, RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_stays_quiet() -> None:
    rules = alert_rules()
    assert set(rules) == EXPECTED_ALERTS
    fires, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == EXPECTED_ALERTS, f"no firing case for {sorted(EXPECTED_ALERTS - fires)}"
    assert quiet == EXPECTED_ALERTS, f"no quiet case for {sorted(EXPECTED_ALERTS - quiet)}"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.parametrize("mutation", ["always", "never"])
def test_the_unit_tests_catch_each_alert_firing_always_or_never(tmp_path: Path, mutation: str) -> None:
    """For each alert in turn, a copy of the rules where only that alert always (or never) fires must
    fail the unit tests: each alert's own cases hold it both ways."""
    tool = promtool()
    expr = "vector(1)" if mutation == "always" else "vector(1) > 2"

    def mutated(name: str) -> tuple[str, subprocess.CompletedProcess]:
        folder = tmp_path / name
        folder.mkdir()
        cases = yaml.safe_load(RULE_TESTS.read_text())  # only this alert's cases: the others cannot fail
        cases["tests"] = [
            c for c in cases["tests"] if any(t["alertname"] == name for t in c["alert_rule_test"])
        ]
        (folder / "alerts_test.yml").write_text(yaml.safe_dump(cases))
        document = yaml.safe_load(RULES.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                if rule["alert"] == name:
                    rule["expr"] = expr
                    rule.pop("for", None)
        (folder / "alerts.yml").write_text(yaml.safe_dump(document))
        return name, run_rule_tests(tool, folder)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, done in pool.map(mutated, sorted(EXPECTED_ALERTS)):
            assert done.returncode != 0, f"{name} {mutation} firing passes the unit tests"
            assert name in done.stdout + done.stderr


def test_the_rules_name_only_metrics_the_service_registers() -> None:
    from service.metrics import ServiceMetrics

    registry = ServiceMetrics().registry
    registered = {sample.name for family in registry.collect() for sample in family.samples}
    for name, rule in alert_rules().items():
        names = set(re.findall(r"\b(?:ndot|process)_[a-z0-9_]+", rule["expr"]))
        assert names, f"{name} names no metric of the service"
        assert names <= registered, f"{name}: {sorted(names - registered)} not in service/metrics.py"
        others = set(re.findall(r"\b[A-Za-z_]+(?=\{)", rule["expr"])) - names
        assert others <= PROMETHEUS_SERIES, f"{name} names {sorted(others)}"


def test_prometheus_and_the_compose_stack_load_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert [(PROMETHEUS.parent / f).resolve() for f in config["rule_files"]] == [RULES.resolve()]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    mounted = {
        volume.split(":")[1]: (REPO / volume.split(":")[0]).resolve()
        for volume in volumes
        if volume.startswith("./")
    }
    config_in_container = Path("/etc/prometheus/prometheus.yml")
    for rule_file in config["rule_files"]:  # the same relative path resolves inside the container
        inside = (config_in_container.parent / rule_file).as_posix()
        host = next(
            src / Path(inside).relative_to(dst) for dst, src in mounted.items() if inside.startswith(dst)
        )
        assert host.resolve() == RULES.resolve()


def test_the_dashboard_shows_the_alert_states_and_both_accuracies() -> None:
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/ndot.json").read_text())
    panels = {panel["title"]: panel for panel in dashboard["panels"]}
    alerts = " ".join(target["expr"] for target in panels["Alerts"]["targets"])
    assert "ALERTS{" in alerts and 'alertstate="firing"' in alerts and 'alertstate="pending"' in alerts
    assert all(name.startswith("Ndot") for name in EXPECTED_ALERTS) and 'alertname=~"Ndot.+"' in alerts
    accuracy = " ".join(target["expr"] for target in panels["Online accuracy"]["targets"])
    assert "ndot_online_accuracy" in accuracy and "ndot_prequential_accuracy" in accuracy

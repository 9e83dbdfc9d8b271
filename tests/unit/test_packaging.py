"""The shipped config examples, the Dockerfile and the deploy/ manifests stay valid."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("name", ["iopfd.toml", "iopfd-host.toml", "iopfd-sidecar.toml"])
def test_config_examples_pass_check_config(name):
    result = subprocess.run([sys.executable, "-m", "iopfd", "check-config", str(ROOT / "config" / name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dockerfile_passes_hadolint_and_pins_this_version():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"iopfd=={version}" in dockerfile
    assert "HEALTHCHECK" in dockerfile and dockerfile.count("FROM ") == 2
    assert 'CMD ["run", "--config", "/etc/iopfd/iopfd.toml"]' in dockerfile
    assert "COPY config/iopfd-host.toml /etc/iopfd/iopfd.toml" in dockerfile


def exported_metric_names() -> set[str]:
    from collections import Counter

    from iopfd.engine import Engine, QueueConfig, QueueServer
    from iopfd.iommufd.emulated import EmulatedFaultQueue
    from iopfd.policies import AcceptPolicy
    from iopfd.service.metrics import registry_for

    engine = Engine()
    emulated = EmulatedFaultQueue()
    engine.add(QueueServer(emulated.open(), AcceptPolicy(), QueueConfig("q")))
    control_requests = Counter({("status", "ok"): 1})
    names = {sample.name for metric in registry_for(engine, control_requests).collect() for sample in metric.samples}
    emulated.close()
    return names


def test_grafana_dashboard_queries_only_metrics_iopfd_exports():
    import re

    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\biopfd_[a-z_]+", expr)}
    assert used and used <= exported_metric_names(), used - exported_metric_names()
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("outcome", "latency", "pending", "shed"):
        assert topic in titles


def test_kubernetes_and_prometheus_manifests():
    import yaml
    (daemonset,) = list(yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text()))
    assert daemonset["kind"] == "DaemonSet"
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "run" and container["ports"][0]["containerPort"] == 9769
    assert daemonset["spec"]["selector"]["matchLabels"] == daemonset["spec"]["template"]["metadata"]["labels"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus-scrape.yaml").read_text())
    assert {job["job_name"] for job in scrape["scrape_configs"]} == {"iopfd", "iopfd-kubernetes"}

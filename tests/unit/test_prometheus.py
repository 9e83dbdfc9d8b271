"""deploy/ against a real Prometheus (Debian's prometheus package, which brings promtool; ./dev test
installs it): the alert rules pass promtool's checks and unit tests, and a Prometheus scraping a
daemon under load answers every query of the Grafana dashboard with data and evaluates every rule."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from iopfd.client import Client
from iopfd.protocol import ProtocolError
from iopfd_dev.daemon import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EMULATED_DAEMON = ROOT / "tests" / "emulated_daemon.py"
SCRAPES = 5  # scrapes (1 s apart) before querying: rate() over any window needs two
# Deliberately bypasses any http_proxy in the environment: everything here is on 127.0.0.1.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: ./dev test installs it (apt-get install prometheus)")
    return path


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = subprocess.run([tool("promtool"), "check", "rules", str(DEPLOY / "alerts.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts_test = ROOT / "tests" / "prometheus" / "alerts_test.yaml"
    tested = subprocess.run([tool("promtool"), "test", "rules", str(alerts_test)],
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())["groups"][0]["rules"]
    tests = yaml.safe_load((ROOT / "tests" / "prometheus" / "alerts_test.yaml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in rules}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """``prometheus`` on 127.0.0.1 with its storage in ``tmp``, scraping ``target`` every second as the
    iopfd job of deploy/prometheus-scrape.yaml, with deploy/alerts.yaml evaluated every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        scrape = yaml.safe_load((DEPLOY / "prometheus-scrape.yaml").read_text())
        (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "iopfd"]
        job |= {"scrape_interval": "1s", "static_configs": [{"targets": [target]}]}
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                          "rule_files": [str(DEPLOY / "alerts.yaml")], "scrape_configs": [job]}))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = tmp / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with HTTP.open(f"{self.url}{path}?{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def until(self, what: str, predicate, timeout: float = 90.0):
        """Polls ``predicate()`` until it returns something true, and returns that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                found = predicate()
            except OSError:  # not listening yet
                found = None
            if found:
                return found
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout} s\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(tmp_path):
    from emulated_daemon import write_config

    process = DaemonProcess(tmp_path, (), str(write_config(tmp_path)), program=(str(EMULATED_DAEMON),))
    yield process
    process.close()


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path, target))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def control_requests(path: str) -> None:
    with Client(path, timeout=10) as client:
        client.status()
        with pytest.raises(ProtocolError):
            client.request("detach", (), queue="vm9")


def dashboard_queries(queue: str | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, with $queue set to ``queue``, else to Grafana's "All"
    (the variable's allValue)."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    (variable,) = [var for var in dashboard["templating"]["list"] if var["name"] == "queue"]
    return [(panel["title"], target["expr"].replace("$queue", queue or variable["allValue"]))
            for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.mark.timeout(600)
def test_a_real_prometheus_gets_data_for_every_dashboard_query_and_evaluates_every_rule(daemon, prometheus, tmp_path):
    daemon.wait_ready()
    (metrics,) = [event["address"] for event in daemon.log_events() if event["event"] == "metrics"]
    host_port = metrics.removeprefix("http://").removesuffix("/metrics")
    assert host_port.startswith("127.0.0.1:")
    control_requests(str(tmp_path / "control.sock"))
    server = prometheus(host_port)
    server.until(f"{SCRAPES} scrapes of the daemon", lambda: server.query(
        f'count_over_time(up{{job="iopfd"}}[1m]) >= {SCRAPES} and on () up{{job="iopfd"}} == 1'))

    results = {}
    for title, expr in dashboard_queries() + dashboard_queries("vm1"):
        result = server.query(expr)
        values = [float(series["value"][1]) for series in result]
        assert values and all(math.isfinite(value) for value in values), (title, expr, result)
        results[expr] = {tuple(sorted(series["metric"].items())): value for series, value in zip(result, values)}
    pending = results['sum by (queue) (iopfd_pending_groups{queue=~"vm1"})']
    assert {dict(labels)["queue"] for labels in pending} == {"vm1"}
    by_outcome = {dict(labels)["outcome"]: value for labels, value in
                  results['sum by (outcome) (rate(iopfd_fault_groups_total{queue=~".*"}[1m]))'].items()}
    assert set(by_outcome) == {"success", "invalid", "deadline", "shed", "error"}
    assert all(value > 0 for value in by_outcome.values()), by_outcome
    write_errors = {dict(labels)["queue"]: value for labels, value in
                    results['sum by (queue) (rate(iopfd_response_write_errors_total{queue=~".*"}[1m]))'].items()}
    assert write_errors["vm1"] > 0 and write_errors["vm2"] == 0, write_errors  # vm1's device is detached each second
    assert list(results["sum by (instance) (iopfd_queues)"].values()) == [2]
    control = {(dict(labels)["op"], dict(labels)["result"]) for labels in
               results["sum by (op, result) (rate(iopfd_control_requests_total[5m]))"]}
    assert control == {("status", "ok"), ("detach", "no-such-queue")}

    # The dashboard's $queue variable: label_values(METRIC, LABEL) is the label values API.
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]).groups()
            assert server.get(f"/api/v1/label/{label}/values", **{"match[]": metric}) == ["vm1", "vm2"]

    # Every rule evaluated without error; the load's own trouble (deadlines, shedding, groups the
    # kernel answered on a detach) has the matching alerts pending, per queue, and nothing else.
    def evaluated():  # a rule never evaluated has lastEvaluation 0001-01-01T00:00:00Z
        rules = [rule for group in server.get("/api/v1/rules")["groups"] for rule in group["rules"]]
        return rules if rules and all(not rule["lastEvaluation"].startswith("0001-") for rule in rules) else None

    rules = server.until("every rule evaluated", evaluated)
    # A rule on a metric nobody exports evaluates fine and never fires: each metric it names is scraped.
    named = {name for rule in rules for name in re.findall(r"\b(?:iopfd|process)_\w+|\bup\b", rule["query"])}
    assert [name for name in sorted(named) if not server.query(f'count({{__name__="{name}", job="iopfd"}})')] == []
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in yaml.safe_load(
        (DEPLOY / "alerts.yaml").read_text())["groups"][0]["rules"]}
    assert [(rule["name"], rule["health"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
    expected = {("IopfdDeadlineAnswers", "vm1"), ("IopfdDeadlineAnswers", "vm2"), ("IopfdShedding", "vm2"),
                ("IopfdPolicyErrors", "vm1"), ("IopfdResponseWriteErrors", "vm1")}

    def active():
        alerts = {(alert["labels"]["alertname"], alert["labels"].get("queue")): alert["state"]
                  for alert in server.get("/api/v1/alerts")["alerts"]}
        return alerts if expected <= set(alerts) else None

    alerts = server.until("the load's alerts pending", active)
    assert set(alerts) == expected and set(alerts.values()) <= {"pending", "firing"}, alerts

    assert daemon.terminate() == 0, daemon.output()
    totals = daemon.totals()
    assert all(totals[outcome] for outcome in ("success", "invalid", "deadline", "shed", "error")), totals

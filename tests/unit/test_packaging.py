"""The wheel installed without the checkout, install-units, the man page, --version; the shipped config
examples, the Dockerfile and the deploy/ manifests stay valid."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from iopfd.service.install import HIDDEN_FROM_SERVICE

ROOT = Path(__file__).parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IOPFD = Path(sys.executable).parent / "iopfd"  # this checkout's, in the project's venv
UNIT_FILES = ("etc/systemd/system/iopfd.service", "etc/systemd/system/iopfd.socket")
EXAMPLES = ("iopfd.toml", "iopfd-host.toml", "iopfd-sidecar.toml")


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)


def test_version_is_the_packages():
    result = run([IOPFD, "--version"])
    assert result.returncode == 0 and result.stdout == f"iopfd {VERSION}\n", result


def test_man_page_matches_the_parser_and_formats_cleanly():
    from iopfd.cli import build_parser

    builder = runpy.run_path(str(ROOT / "man" / "build_manpage.py"))
    page = ROOT / "man" / "iopfd.8"
    assert page.read_text() == builder["render"](build_parser()), \
        f"stale: run {sys.executable} man/build_manpage.py"
    for command in ("probe", "run [", "check-config FILE", "install-units [", "status [", "detach QUEUE"):
        assert f"\n.B iopfd {command}".replace("-", "\\-") in page.read_text(), command
    result = run(["groff", "-man", "-ww", "-z", page])  # groff-base, with man-db (./dev test installs it)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def install_units(iopfd: Path, root: Path, **kwargs) -> subprocess.CompletedProcess:
    return run([iopfd, "install-units", "--root", root], **kwargs)


def test_install_units_writes_the_shipped_files_with_this_iopfd_in_execstart(tmp_path):
    result = install_units(IOPFD, tmp_path)
    assert result.returncode == 0, result.stderr
    shipped_service = (ROOT / "systemd" / "iopfd.service").read_text()
    service = (tmp_path / UNIT_FILES[0]).read_text()
    assert service == shipped_service.replace("ExecStart=/usr/local/bin/iopfd ", f"ExecStart={IOPFD} ")
    assert f"\nExecStart={IOPFD} run --config /etc/iopfd/iopfd.toml\n" in service
    assert (tmp_path / UNIT_FILES[1]).read_text() == (ROOT / "systemd" / "iopfd.socket").read_text()
    assert (tmp_path / "etc/iopfd/iopfd.toml").read_text() == (ROOT / "config" / "iopfd-host.toml").read_text()
    assert (tmp_path / "usr/local/share/man/man8/iopfd.8").read_text() == (ROOT / "man" / "iopfd.8").read_text()
    for name in EXAMPLES:
        assert (tmp_path / "usr/local/share/doc/iopfd/examples" / name).read_text() == \
            (ROOT / "config" / name).read_text()
    assert oct((tmp_path / UNIT_FILES[0]).stat().st_mode & 0o777) == "0o644"
    assert f"installed {tmp_path / UNIT_FILES[0]}\n" in result.stdout
    assert "next:" not in result.stdout  # systemctl lines only for the running system


def test_install_units_run_as_a_module_names_the_venvs_iopfd(tmp_path):
    result = run([sys.executable, "-m", "iopfd", "install-units", "--root", tmp_path])
    assert result.returncode == 0, result.stderr
    assert f"\nExecStart={IOPFD} run --config" in (tmp_path / UNIT_FILES[0]).read_text()


def test_install_units_keeps_the_operators_config(tmp_path):
    config = tmp_path / "etc/iopfd/iopfd.toml"
    config.parent.mkdir(parents=True)
    config.write_text('policy = "reject"\n')
    result = install_units(IOPFD, tmp_path)
    assert result.returncode == 0, result.stderr
    assert config.read_text() == 'policy = "reject"\n'
    assert f"kept {config}: it exists" in result.stdout


def test_install_units_into_an_unwritable_place_names_the_cause(tmp_path):
    (tmp_path / "etc").write_text("a file where a directory must be")
    result = install_units(IOPFD, tmp_path)
    assert result.returncode == 1
    assert f"cannot write {tmp_path}/etc/systemd/system/iopfd.service" in result.stderr
    assert "run it as root, or give --root DIR" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_install_docs_name_this_versions_wheel(doc):
    text = (ROOT / doc).read_text()
    assert f"uv tool install --python /usr/bin/python3 ./iopfd-{VERSION}-py3-none-any.whl" in text
    assert "iopfd install-units" in text and "pip install iopfd" not in text


@pytest.mark.timeout(300)
def test_the_wheel_installed_outside_the_checkout_runs_and_installs_its_units(tmp_path):
    """Build the wheel, install it into a fresh venv under tmp with the locked dependencies from uv's
    cache (no network), the way `uv tool install` lays it out (a venv, a symlink to its iopfd), and
    run what docs/operations.md tells an operator to run from there."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is missing: ./dev installs it"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}

    result = run([uv, "build", "--wheel", "--offline", "--out-dir", tmp_path / "dist"], env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("iopfd-*.whl")
    shipped = zipfile.ZipFile(wheel).namelist()
    tooling = [n for n in shipped if n.startswith(("iopfd_dev/", "iopfd/lab/", "iopfd/bench/"))
               or n.endswith(("/demo.py", "/emulated.py", ".c", ".h"))]
    assert not tooling, f"the wheel ships development tooling: {tooling}"
    carried = {"systemd/iopfd.service", "systemd/iopfd.socket", "man/iopfd.8", *(f"config/{n}" for n in EXAMPLES)}
    assert {f"iopfd/data/{path}" for path in carried} <= set(shipped)
    pylock = tmp_path / "pylock.toml"
    result = run([uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--format", "pylock.toml",
                  "-o", pylock], env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    venv = tmp_path / "opt" / "iopfd"
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for argv in ([uv, "venv", "--offline", "--python", python, venv],
                 [uv, "pip", "install", "--offline", "--python", venv / "bin" / "python", "-r", pylock],
                 [uv, "pip", "install", "--offline", "--python", venv / "bin" / "python", wheel]):
        result = run(argv, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    iopfd = tmp_path / "usr" / "local" / "bin" / "iopfd"
    iopfd.parent.mkdir(parents=True)
    iopfd.symlink_to(venv / "bin" / "iopfd")

    where = run([venv / "bin" / "python", "-c", "import iopfd; print(iopfd.__file__)"], env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where  # the wheel's code, not the checkout's
    result = run([iopfd, "--version"], env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == f"iopfd {VERSION}\n", result

    root = tmp_path / "root"
    result = install_units(iopfd, root, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (hidden, option) = next((h, o) for h, o in HIDDEN_FROM_SERVICE.items() if tmp_path.is_relative_to(h))
    assert f"iopfd.service cannot reach the iopfd command at {iopfd}: {option} hides {hidden}" in result.stderr
    service = (root / UNIT_FILES[0]).read_text()
    assert f"\nExecStart={iopfd} run --config /etc/iopfd/iopfd.toml\n" in service  # the symlink, kept

    configs = [root / "etc/iopfd/iopfd.toml", *(root / "usr/local/share/doc/iopfd/examples" / n for n in EXAMPLES)]
    for config in configs:
        result = run([iopfd, "check-config", config], env=env, cwd=tmp_path)
        assert result.returncode == 0 and result.stdout.startswith(f"{config}: ok"), result.stderr

    # Documentation=man:iopfd(8) must resolve: the page install-units put there, as man(1) finds it.
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd"
    result = run([analyze, "verify", "--man=yes", *(root / unit for unit in UNIT_FILES)], cwd=tmp_path,
                 env={**env, "MANPATH": str(root / "usr/local/share/man")})
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


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

    from iopfd.engine import Engine, FixedPolicy, QueueConfig, QueueResponder
    from iopfd.iommufd import SUCCESS
    from iopfd.service.metrics import registry_for
    from iopfd_dev.emulated import EmulatedFaultQueue

    engine = Engine()
    emulated = EmulatedFaultQueue()
    engine.add(QueueResponder(emulated.open(), FixedPolicy("accept", SUCCESS), QueueConfig("q")))
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

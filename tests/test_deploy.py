"""
deploy/: the compose file and the systemd unit that supervise mqttsvc as the
old system was (issue 16): restarted after a crash, not after a deliberate
stop; health checks; secrets as files; a stop timeout above the drain.  And
three replicas sharing the sites (issue 17), with compose and as a
Kubernetes Deployment.

Each is checked by its text everywhere, and by its own tool where the tool
is installed (docker compose config, systemd-analyze verify); where it is
not, that test is skipped with the reason, never passed silently.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CLUSTER_COMPOSE = DEPLOY / "compose.cluster.yaml"
UNIT = DEPLOY / "mqttsvc.service"


def services(text: str) -> dict[str, str]:
    """Each service's block of compose.yaml (two-space indented names under services:)."""
    body = text.split("\nservices:\n", 1)[1].split("\n\n\n", 1)[0]
    body = re.split(r"\n(?=\S)", body, maxsplit=1)[0]
    blocks = re.split(r"^  (?=[a-z][\w-]*:\n)", body, flags=re.MULTILINE)
    return {block.split(":", 1)[0]: block for block in blocks if block.strip()}


def test_compose_file_supervises_migrates_first_and_keeps_secrets_in_files() -> None:
    """
    PostgreSQL, Mosquitto and mqttsvc restart unless stopped and have health
    checks; migrate runs once after PostgreSQL is healthy and mqttsvc only
    after it succeeded; secrets are files, not environment values; the stop
    grace period is above the 10 s drain.
    """
    text = COMPOSE.read_text()
    blocks = services(text)
    assert set(blocks) == {"postgres", "mosquitto", "migrate", "mqttsvc"}
    for name in ("postgres", "mosquitto", "mqttsvc"):
        assert "\n    restart: unless-stopped\n" in blocks[name], name
        assert "\n    healthcheck:\n" in blocks[name], name
    assert 'restart: "no"' in blocks["migrate"]
    assert 'command: ["mqttsvc", "migrate"]' in blocks["migrate"]
    assert re.search(r"postgres:\n\s+condition: service_healthy", blocks["migrate"])
    assert re.search(r"migrate:\n\s+condition: service_completed_successfully", blocks["mqttsvc"])
    grace = re.search(r"stop_grace_period: (\d+)s", blocks["mqttsvc"])
    assert grace and int(grace.group(1)) > 10
    for variable in ("MQTTSVC_RPC_TOKEN_FILE", "MQTTSVC_SECRET_KEY_FILE"):
        assert re.search(rf"{variable}: /run/secrets/\w+", blocks["mqttsvc"]), variable
    assert "passfile=/run/secrets/mqttsvc_pgpass" in blocks["mqttsvc"]
    assert "POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password" in blocks["postgres"]
    assert not re.search(r"PASSWORD: |TOKEN: |password=", text), "a secret in the environment"
    declared = re.findall(r"^  (\w+):\n    file: \./secrets/", text, re.MULTILINE)
    assert set(declared) == {"postgres_password", "mqttsvc_pgpass", "mqttsvc_tokens", "mqttsvc_key"}


def _compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("name", [COMPOSE.name, CLUSTER_COMPOSE.name])
def test_docker_compose_accepts_the_compose_file(tmp_path: Path, name: str) -> None:
    """docker compose config reads the file, its secrets in place, without an error."""
    compose = _compose()
    if compose is None:
        pytest.skip(
            "docker compose is not installed here (docker has no compose plugin): "
            f"{name} was checked by its text only"
        )
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work)
    (work / "secrets").mkdir()
    for name in ("postgres_password", "pgpass", "tokens", "secret.key"):
        (work / "secrets" / name).write_text("x\n")
    run = subprocess.run(
        [*compose, "-f", str(work / name), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_systemd_unit_restarts_on_failure_and_is_hardened() -> None:
    """
    Restart=on-failure (a deliberate stop is not restarted), a stop timeout
    above the 10 s drain, the descriptor limit, migrations before start,
    and the hardening options.
    """
    settings = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), re.MULTILINE))
    assert settings["Restart"] == "on-failure"
    assert int(settings["TimeoutStopSec"]) > 10
    assert int(settings["LimitNOFILE"]) >= 65536
    assert settings["ExecStartPre"].endswith("mqttsvc migrate")
    assert settings["ExecStart"].endswith("twistd -n --pidfile= mqttsvc")
    for option, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
    }.items():
        assert settings[option] == value, option


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """
    systemd-analyze verify finds nothing to say about the unit, its programs
    pointed at this checkout's virtualenv (as an install would have them).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the unit was checked by its text only")
    bin_dir = Path(sys.executable).parent
    unit = tmp_path / "mqttsvc.service"
    unit.write_text(
        UNIT.read_text()
        .replace("/opt/mqttsvc/bin", str(bin_dir))
        .replace("/etc/mqttsvc/env", str(DEPLOY / "mqttsvc.env"))
    )
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr


KUBERNETES = DEPLOY / "kubernetes.yaml"


def test_kubernetes_runs_three_cluster_replicas_with_readiness_and_secrets_in_files() -> None:
    """
    The Kubernetes example runs three replicas with --cluster, each named
    for its pod (instance names must differ among live instances), ready on
    an authenticated /readyz, live on /healthz, migrated by an init container
    first, stopped within a grace period above the shutdown deadline, and
    with its secrets as files (never in the manifest or the environment).
    """
    text = KUBERNETES.read_text()
    assert re.search(r"^  replicas: 3$", text, re.MULTILINE)
    assert '{name: MQTTSVC_CLUSTER, value: "1"}' in text
    assert re.search(
        r"name: MQTTSVC_INSTANCE\n\s+valueFrom: \{fieldRef: \{fieldPath: metadata.name\}\}", text
    )
    assert 'command: ["mqttsvc", "migrate"]' in text.split("initContainers:", 1)[1]
    readiness = text.split("readinessProbe:", 1)[1].split("resources:", 1)[0]
    assert (
        "/readyz" in readiness
        and "Bearer" in readiness
        and "/run/secrets/mqttsvc/tokens" in readiness
    )
    assert "httpGet: {path: /healthz, port: http}" in text.split("livenessProbe:", 1)[1]
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", text)
    assert grace and int(grace.group(1)) > 10
    for variable in ("MQTTSVC_RPC_TOKEN_FILE", "MQTTSVC_SECRET_KEY_FILE"):
        assert re.search(rf"name: {variable}, value: /run/secrets/mqttsvc/\w", text), variable
    assert "passfile=/run/secrets/mqttsvc/pgpass" in text
    assert not re.search(r"PASSWORD|password=|TOKEN, value: [^/]", text), "a secret in the manifest"
    assert "defaultMode: 0440" in text


def test_compose_runs_three_cluster_replicas_ready_on_readyz_with_secrets_in_files() -> None:
    """
    The three-replica compose file runs three services of the same image,
    each with --cluster and an --instance name of its own, on a port of its
    own on loopback, after the one-shot migration, against one PostgreSQL
    and one Mosquitto that keeps its sessions and queues without limit.
    Every replica restarts unless stopped, is healthy when an authenticated
    /readyz answers (the token read from the mounted file), stops within a
    grace period above the shutdown deadline, listens on every interface of
    its container only with the reason said, and takes its secrets as files.
    """
    text = CLUSTER_COMPOSE.read_text()
    blocks = services(text)
    replicas = {"mqttsvc-a", "mqttsvc-b", "mqttsvc-c"}
    assert set(blocks) == {"postgres", "mosquitto", "migrate"} | replicas
    shared = text.split("\nx-mqttsvc: &mqttsvc\n", 1)[1].split("\nservices:\n", 1)[0]
    instances = []
    ports = []
    for name in sorted(replicas):
        block = blocks[name]
        assert "\n    <<: *mqttsvc\n" in block, name
        command = re.search(r"command: \[(.*)\]", block)
        assert command, name
        args = [a.strip().strip('"') for a in command.group(1).split(",")]
        assert args[:4] == ["twistd", "-n", "--pidfile=", "mqttsvc"], args
        assert "--cluster" in args, name
        instances.append(args[args.index("--instance") + 1])
        [port] = re.findall(r'- "127\.0\.0\.1:(\d+):8780"', block)
        ports.append(port)
    assert sorted(instances) == sorted(replicas), "an --instance name each, the service's"
    assert len(set(ports)) == 3

    assert "\n  restart: unless-stopped\n" in shared
    assert re.search(r"migrate:\n\s+condition: service_completed_successfully", shared)
    assert re.search(r"postgres:\n\s+condition: service_healthy", shared)
    health = shared.split("\n  healthcheck:\n", 1)[1]
    assert "http://127.0.0.1:8780/readyz" in health
    assert '"Bearer " + token' in health and 'open("/run/secrets/mqttsvc_tokens")' in health
    grace = re.search(r"stop_grace_period: (\d+)s", shared)
    assert grace and int(grace.group(1)) > 10
    listener = shared.split("MQTTSVC_RPC: tcp:8780:interface=0.0.0.0", 1)[0].rsplit(
        "environment:", 1
    )[1]
    assert "private" in listener, "the reason for every interface, in a comment above it"
    for variable in ("MQTTSVC_RPC_TOKEN_FILE", "MQTTSVC_SECRET_KEY_FILE"):
        assert re.search(rf"{variable}: /run/secrets/\w+", shared), variable
    assert "passfile=/run/secrets/mqttsvc_pgpass" in shared

    assert 'restart: "no"' in blocks["migrate"]
    assert 'command: ["mqttsvc", "migrate"]' in blocks["migrate"]
    assert re.search(r"postgres:\n\s+condition: service_healthy", blocks["migrate"])
    assert "build: .." in blocks["migrate"]
    assert "POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password" in blocks["postgres"]
    assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in blocks["mosquitto"]
    broker = dict(
        line.split(None, 1)
        for line in (DEPLOY / "mosquitto.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert (broker["persistence"], broker["max_queued_messages"]) == ("true", "0")
    assert not re.search(r"PASSWORD: |TOKEN: |password=", text), "a secret in the environment"
    declared = re.findall(r"^  (\w+):\n    file: \./secrets/", text, re.MULTILINE)
    assert set(declared) == {"postgres_password", "mqttsvc_pgpass", "mqttsvc_tokens", "mqttsvc_key"}

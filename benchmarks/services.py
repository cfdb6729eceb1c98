"""Local services for the tests, started as processes on loopback from what `make services`
built into .services/ (deploy/local/*.pom.xml, Prism from the Go module proxy).

>>> sorted(SERVICES)
['kafka', 'kafka-expansion-service', 'prism']
"""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVICES_DIR = REPO / ".services"
SERVICES = {
    "kafka": SERVICES_DIR / "kafka" / "libs",
    "kafka-expansion-service": SERVICES_DIR / "kafka-expansion-service",
    "prism": SERVICES_DIR / "bin" / "prism",
}


def service_path(name: str) -> pathlib.Path:
    """Where `make services` put `name`; the test fails when it is missing in CI (which runs
    `make test`, building them) and skips elsewhere."""
    path = SERVICES[name]
    if not path.exists() or shutil.which("java") is None:
        message = f"{name} is not built (or Java is missing): run `make services`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def expansion_service_jar() -> pathlib.Path:
    """The launcher jar of Beam's Kafka expansion service (its libs/ beside it)."""
    jars = sorted(service_path("kafka-expansion-service").glob("beam-kafka-expansion-*.jar"))
    assert jars, "the expansion service's jar is missing from .services"
    return jars[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _cluster_id() -> str:
    """A KRaft cluster id: a UUID in URL-safe base64, as `kafka-storage random-uuid`."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


@contextlib.contextmanager
def kafka_broker(directory: pathlib.Path, timeout: float = 60.0) -> Iterator[str]:
    """A single-node KRaft broker (no ZooKeeper) on loopback; yields its bootstrap address.
    Topics are created on first use, with one partition."""
    libs = service_path("kafka")
    port, controller = free_port(), free_port()
    directory.mkdir(parents=True, exist_ok=True)
    properties = directory / "server.properties"
    properties.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={directory / 'data'}",
                "num.partitions=1",
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=true",
            ]
        )
        + "\n"
    )
    classpath = f"{libs}/*"
    storage_tool = ["java", "-cp", classpath, "kafka.tools.StorageTool"]
    subprocess.run(
        [*storage_tool, "format", "--standalone", "-t", _cluster_id(), "-c", str(properties)],
        check=True,
        capture_output=True,
    )
    log = (directory / "broker.log").open("w")
    broker = subprocess.Popen(
        ["java", "-Xmx512m", "-cp", classpath, "kafka.Kafka", str(properties)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _accepts(port):
            if broker.poll() is not None or time.monotonic() > deadline:
                log_text = (directory / "broker.log").read_text()
                pytest.fail(f"the Kafka broker did not start:\n{log_text}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        broker.terminate()
        try:
            broker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
        log.close()

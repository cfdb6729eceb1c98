"""Local services for the tests and benchmarks, started as processes on loopback from what
`make services` built into .services/ (deploy/local/*.pom.xml, Prism from the Go module
proxy).

>>> sorted(SERVICES)
['kafka', 'kafka-expansion-service', 'prism']
>>> try:
...     service_path("kafka", services_dir=pathlib.Path("/nowhere"))
... except ServiceUnavailable as missing:
...     print(missing)
kafka is not built: run `make services` (looked in /nowhere/kafka/libs)
"""

from __future__ import annotations

import base64
import contextlib
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVICES_DIR = REPO / ".services"
# Where `make services` puts each, under SERVICES_DIR.
SERVICES = {
    "kafka": pathlib.Path("kafka", "libs"),
    "kafka-expansion-service": pathlib.Path("kafka-expansion-service"),
    "prism": pathlib.Path("bin", "prism"),
}


class ServiceUnavailable(RuntimeError):
    """A service `make services` has not built here, or Java to run it is missing."""


def service_path(name: str, services_dir: pathlib.Path = SERVICES_DIR) -> pathlib.Path:
    """Where `make services` put `name`."""
    path = services_dir / SERVICES[name]
    if not path.exists():
        raise ServiceUnavailable(f"{name} is not built: run `make services` (looked in {path})")
    if name != "prism" and shutil.which("java") is None:
        raise ServiceUnavailable(f"{name} needs Java, which is not on the PATH")
    return path


def expansion_service_jar() -> pathlib.Path:
    """The launcher jar of Beam's Kafka expansion service (its libs/ beside it)."""
    jars = sorted(service_path("kafka-expansion-service").glob("beam-kafka-expansion-*.jar"))
    if not jars:
        raise ServiceUnavailable("the expansion service's jar is missing: run `make services`")
    return jars[-1]


def prism_flags() -> list[str]:
    """Beam flags that run a job on the Prism `make services` built, its SDK workers in this
    process (the local runners' way, so the job's in-process parts work as there)."""
    prism = service_path("prism")
    return ["--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK"]


def stop(
    process: subprocess.Popen, timeout: float = 30.0, sig: signal.Signals = signal.SIGTERM
) -> None:
    """Sends `process` `sig` (SIGTERM: terminate), killing it if it has not ended within
    `timeout`."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
    # --cluster-id=ID: an id may start with "-", which would read as an option.
    format_storage = ["format", "--standalone", f"--cluster-id={_cluster_id()}"]
    storage_tool = ["java", "-cp", classpath, "kafka.tools.StorageTool"]
    subprocess.run(
        [*storage_tool, *format_storage, f"--config={properties}"], check=True, capture_output=True
    )
    broker = ["java", "-Xmx512m", "-cp", classpath, "kafka.Kafka", str(properties)]
    with _serving(broker, port, directory / "broker.log", "the Kafka broker", timeout):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def _serving(
    command: list[str], port: int, log_path: pathlib.Path, name: str, timeout: float
) -> Iterator[None]:
    """Runs `command` as a process logging to `log_path` until the block ends, once it
    accepts connections on `port`; ServiceUnavailable (with its log) if it does not."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _accepts(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise ServiceUnavailable(f"{name} did not start:\n{log_path.read_text()}")
                time.sleep(0.1)
            yield
        finally:
            stop(process)


# What a local S3 server takes: any credentials, one region.
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "aevb-test",
    "AWS_SECRET_ACCESS_KEY": "aevb-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_server_executable() -> str:
    """moto's `moto_server` beside this Python (a dev dependency)."""
    server = shutil.which("moto_server", path=str(pathlib.Path(sys.executable).parent))
    if server is None:
        raise ServiceUnavailable("moto_server is not installed: run `make install`")
    return server


@contextlib.contextmanager
def s3_server(directory: pathlib.Path, timeout: float = 30.0) -> Iterator[str]:
    """An S3 endpoint on loopback (moto's server, a dev dependency, as a process); yields
    its URL. Any credentials are accepted (`S3_TEST_CREDENTIALS`); buckets are created with
    boto3 or the AWS CLI, as on S3."""
    server = s3_server_executable()
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    command = [server, "-H", "127.0.0.1", "-p", str(port)]
    with _serving(command, port, directory / "s3.log", "the S3 server", timeout):
        yield f"http://127.0.0.1:{port}"

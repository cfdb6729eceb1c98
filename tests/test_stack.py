"""Tests for docker-compose.yml, deploy/docker/ and the Kafka producer of the `kafka` profile.

No Docker engine runs here: the compose file is validated by Debian's `docker-compose
config -q` (installed by `make prometheus` with Debian's prometheus), every `aevb` command of
a service is parsed by aevb's own parser, and the default trainer's command is run as a
process, so that the stack's commands are the commands the tests run.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
import yaml
from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
from apache_beam.testing.util import assert_that

from pipeline.cli.main import build_parser
from pipeline.ingest.decode import DecodeRecords
from pipeline.ingest.sources import parse_source
from pipeline.jobs.options import AEVBOptions, cadence, drift_settings, model_config
from pipeline.jobs.produce import encode_row, replay_into
from pipeline.jobs.score import ScoreOptions  # noqa: F401 -- registers the score flags with Beam

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
PROFILES = ([], ["flink"], ["kafka"], ["flink", "kafka"])


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        if os.geteuid() == 0:
            pytest.fail("docker-compose is missing although we are root: run `make prometheus`")
        pytest.skip("docker-compose not installed and not root (make prometheus installs it)")
    return path


@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
def test_compose_file_is_valid_for_each_profile(profiles: list[str], tmp_path) -> None:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    completed = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE), *flags, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # No daemon is contacted by `config`; keep the user's DOCKER_HOST out of it anyway.
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"},
    )
    assert completed.returncode == 0, completed.stderr


def test_compose_config_q_rejects_a_broken_file(tmp_path) -> None:
    """The check above can fail: a service whose network namespace does not exist."""
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["prometheus"]["network_mode"] = "service:no-such-trainer"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    completed = subprocess.run(
        [docker_compose(), "-f", str(path), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    assert "no-such-trainer" in completed.stderr


def test_profiles_add_the_promised_services(compose) -> None:
    by_profile: dict[str, set[str]] = {}
    for name, service in _services(compose).items():
        for profile in service.get("profiles", ["default"]):
            by_profile.setdefault(profile, set()).add(name)
    assert by_profile["default"] == {"trainer", "serving", "prometheus", "pushgateway", "grafana"}
    assert by_profile["flink"] == {
        "flink-jobmanager",
        "flink-taskmanager",
        "beam-job-server",
        "beam-worker-pool",
        "trainer-flink",
    }
    assert by_profile["kafka"] == {"kafka", "producer", "trainer-kafka"}


def _aevb_commands(compose: dict) -> dict[str, list[str]]:
    return {
        name: [str(arg) for arg in service["command"]]
        for name, service in _services(compose).items()
        if isinstance(service.get("command"), list) and service["command"][:1] == ["aevb"]
    }


def _beam_unknown(flags: list[str]) -> list[str]:
    """Flags that no registered PipelineOptions class (Beam's, aevb's) knows."""
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(flags)
    return unknown


def test_every_aevb_command_of_the_stack_parses_with_aevbs_own_parser(compose) -> None:
    commands = _aevb_commands(compose)
    assert set(commands) == {"trainer", "trainer-kafka", "trainer-flink", "producer"}
    parser = build_parser()
    for name, command in commands.items():
        args, beam_args = parser.parse_known_args(command[1:])
        if args.command == "train":
            # What `aevb train` checks before it starts a job (pipeline.cli.commands.train).
            options = PipelineOptions([*command[2:]]).view_as(AEVBOptions)
            parse_source(options.source)
            model_config(options)
            cadence(options)
            drift_settings(options)
            assert _beam_unknown(beam_args) == [], name
            assert options.output.startswith("/runs/"), name  # the runs volume
        else:
            assert beam_args == [], name
    trainer = build_parser().parse_known_args(commands["trainer"][1:])[0]
    assert trainer.streaming and trainer.source == "dataset"
    assert trainer.metrics_port == 9890 and trainer.metrics_address == "0.0.0.0"
    flink = build_parser().parse_known_args(commands["trainer-flink"][1:])
    assert flink[0].runner == "PortableRunner"
    assert "--environment_config=beam-worker-pool:50000" in flink[1]
    kafka = PipelineOptions(commands["trainer-kafka"][2:]).view_as(AEVBOptions)
    producer = build_parser().parse_args(commands["producer"][1:])
    assert parse_source(kafka.source) == ("kafka", f"{producer.bootstrap}/{producer.topic}")


def test_the_pieces_of_the_stack_point_at_each_other(compose) -> None:
    services = _services(compose)
    commands = _aevb_commands(compose)
    trainer = build_parser().parse_known_args(commands["trainer"][1:])[0]
    # Serving: the trainer's snapshots of its default model key, on the shared volume.
    serving = services["serving"]
    environment = serving["environment"]
    base_path = f"{environment['MODEL_BASE_PATH']}/{environment['MODEL_NAME']}"
    assert base_path == f"{trainer.output}/snapshots/{trainer.model_key}"
    assert "runs:/runs:ro" in serving["volumes"] and "runs:/runs" in services["trainer"]["volumes"]
    assert any(arg.startswith("--file_system_poll_wait_seconds=") for arg in serving["command"])
    # Prometheus, the Pushgateway and Grafana live in the trainer's network namespace, so the
    # project's configs and their localhost addresses work unchanged.
    for name in ("prometheus", "pushgateway", "grafana"):
        assert services[name]["network_mode"] == "service:trainer", name
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert f"localhost:{trainer.metrics_port}" in targets
    assert "localhost:9091" in targets  # the Pushgateway's port
    published = {int(p.split(":")[0]) for p in services["trainer"]["ports"]}
    assert published >= {trainer.metrics_port, 9090, 9091, 3000}
    mounts = {
        v.split(":")[1]: ROOT / v.split(":")[0]
        for v in services["prometheus"]["volumes"] + services["grafana"]["volumes"]
        if v.startswith("./")
    }
    prometheus_dir = mounts["/etc/prometheus"]
    assert (prometheus_dir / "prometheus.yml").is_file()
    for rule_file in config["rule_files"]:
        assert (prometheus_dir / rule_file).is_file()
    provider = yaml.safe_load(
        (mounts["/etc/grafana/provisioning/dashboards"] / "aevb.yml").read_text()
    )
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert list(mounts[dashboards_path].glob("*.json")), dashboards_path
    datasources = mounts["/etc/grafana/provisioning/datasources"]
    urls = [
        source["url"]
        for path in datasources.glob("*.yml")
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    assert "http://localhost:9090" in urls


def test_the_kafka_profile_runs_the_versions_the_tests_run(compose) -> None:
    """The broker image is the Kafka of deploy/local (tests/test_kafka.py's broker); the
    Kafka trainer runs on Prism, at the Python SDK's version, as `make services` builds it."""
    pom = (ROOT / "deploy/local/kafka-broker.pom.xml").read_text()
    (kafka_version,) = re.findall(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert _services(compose)["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    prism = f"prism@v{beam.__version__}"
    assert prism in DOCKERFILE.read_text()
    assert f"BEAM_VERSION := {beam.__version__}" in (ROOT / "Makefile").read_text()
    command = _aevb_commands(compose)["trainer-kafka"]
    assert command[command.index("--runner") + 1] == "PrismRunner"
    assert command[command.index("--prism_location") + 1] == "/usr/local/bin/prism"
    assert "COPY --from=prism /out/prism /usr/local/bin/prism" in DOCKERFILE.read_text()


def test_images_are_pinned_and_the_trainer_image_is_slim_and_non_root(compose) -> None:
    for name, service in _services(compose).items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.search(r"\d", tag) and tag != "latest", (name, image)
    dockerfile = DOCKERFILE.read_text()
    stages = {name for _, name in re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, re.M)}
    targets = {s["build"]["target"] for s in _services(compose).values() if "build" in s}
    assert targets == {"aevb", "aevb-java", "beam-worker"} and targets <= stages
    bases = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", dockerfile, re.MULTILINE))
    assert bases["PYTHON_IMAGE"].startswith("python:3.11.") and "slim" in bases["PYTHON_IMAGE"]
    for image in bases.values():
        assert re.search(r":\d+\.\d+\.\d+", image), image  # an exact version
    aevb_stage = dockerfile.split(" AS aevb\n", 1)[1].split("\nFROM ", 1)[0]
    assert "USER aevb" in aevb_stage and "useradd" in aevb_stage
    assert "--constraint constraints.txt" in aevb_stage
    # Every dependency of the project is pinned to one version in the constraints.
    pinned = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "deploy/docker/constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    for requirement in re.findall(r'^\s*"([A-Za-z0-9_.-]+)', dependencies, re.MULTILINE):
        assert requirement.lower() in pinned, requirement
    assert "kafka-python" in pinned and "boto3" in pinned  # the extras the images install


@pytest.mark.slow
def test_the_trainer_services_command_runs_as_a_process(compose, tmp_path) -> None:
    """The compose trainer's exact command line, with test-only flags appended (argparse
    takes the last value): a small run directory, a few hundred examples, a free port."""
    command = _aevb_commands(compose)["trainer"]
    overrides = [
        "--output",
        str(tmp_path / "run"),
        "--max-examples",
        "300",
        "--metrics-port",
        "0",
        "--metrics-address",
        "127.0.0.1",
    ]
    aevb = pathlib.Path(sys.executable).parent / "aevb"
    completed = subprocess.run(
        [str(aevb), *command[1:], *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    model_dir = tmp_path / "run" / "snapshots" / "default"
    versions = [p for p in model_dir.iterdir() if p.name.isdigit()]
    assert versions and all((v / "saved_model.pb").is_file() for v in versions)
    metadata = json.loads((versions[-1] / "assets.extra" / "aevb.json").read_text())
    assert metadata["examples_seen"] >= 300


# --- The Kafka producer ---------------------------------------------------------------------


def test_producer_messages_decode_to_the_replayed_rows() -> None:
    rows = np.random.default_rng(0).random((7, 5)).astype(np.float32)
    sent: list[tuple[bytes | None, bytes]] = []
    count = replay_into(lambda k, v: sent.append((k, v)), [rows[:4], rows[4:]], key="sensor-1")
    assert count == 7 and [k for k, _ in sent] == [b"sensor-1"] * 7
    assert encode_row(np.array([0.0, 1.0, 0.25])) == b"0,1,0.25"
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        decoded = pipeline | beam.Create(sent) | DecodeRecords(5, "bernoulli")
        chunks = decoded[None] | beam.combiners.ToList()
        assert_that(chunks, lambda found: _same_rows(found, rows))


def _same_rows(found: list, expected_rows: np.ndarray) -> None:
    """One chunk holding every row, equal to six significant digits, with the key."""
    (only_chunk,) = found[0]
    assert only_chunk.key == "sensor-1"
    np.testing.assert_allclose(only_chunk.rows, expected_rows, rtol=1e-5)


def test_producer_paces_examples_per_second() -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    sent_at: list[float] = []
    replay_into(
        lambda k, v: sent_at.append(now[0]),
        [np.zeros((5, 2), np.float32)],
        examples_per_second=10,
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert sent_at == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])

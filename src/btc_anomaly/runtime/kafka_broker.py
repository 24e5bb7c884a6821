"""A single-node Apache Kafka broker (KRaft, broker+controller) run from the Maven-resolved jars.

Used by `btc-anomaly kafka` (foreground) and by the test suite (one broker per pytest session).
Storage is formatted once per data folder; later starts reuse it, so topics and offsets survive restarts.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from btc_anomaly.runtime.jars import jar_dir, java_executable
from btc_anomaly.runtime.process import ManagedProcess

_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d{ISO8601}] %p %m (%c{1})%n
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log_dir}/server.log
appender.file.filePattern = {log_dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d{ISO8601}] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
rootLogger.appenderRef.console.ref = STDOUT
rootLogger.appenderRef.console.level = {console_level}
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    # Kafka's Uuid.toString(): URL-safe base64 of 16 random bytes, unpadded. Like Kafka's own generator,
    # redraw ids starting with "-": the storage tool's argument parser would read them as an option.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


@dataclass
class KafkaBroker(ManagedProcess):
    data_dir: Path
    jars_root: Path
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    num_partitions: int = 3
    console_level: str = "WARN"
    retention_hours: int = 168
    retention_bytes: int = 1_073_741_824  # per partition
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    name = "kafka broker"
    poll_interval_s = 0.5
    stop_timeout_s = 30.0
    drain_timeout_s = 90.0  # the stream finishes its micro-batch and stops its JVM first

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return self.bootstrap

    @property
    def log_path(self) -> Path:
        return self.log_dir / "stdout.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def _properties(self) -> str:
        h = self.host
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{h}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{h}:{self.port},CONTROLLER://{h}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{h}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "kraft-logs"),
            "num.partitions": str(self.num_partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # The producer creates its topics explicitly; a typo'd topic name should not appear silently.
            "auto.create.topics.enable": "false",
            "log.retention.hours": str(self.retention_hours),
            "log.retention.bytes": str(self.retention_bytes),
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        classpath = str(jar_dir(self.jars_root, "kafka") / "*")
        return [
            java_executable(),
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            classpath,
            main,
            *args,
        ]

    def prepare(self) -> None:
        """Write the config (ports may change between runs) and format storage the first time."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._properties())
        (self.data_dir / "log4j2.properties").write_text(
            _LOG4J2.replace("{log_dir}", str(self.log_dir)).replace("{console_level}", self.console_level)
        )
        if (self.data_dir / "kraft-logs" / "meta.properties").exists():
            return
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            _cluster_id(),
            "-c",
            str(self.config_path),
        )
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"kafka storage format failed: {result.stderr.strip() or result.stdout.strip()}"
            )

    def command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.config_path), heap=self.heap)

    def start(self, timeout_s: float = 60.0) -> None:
        self.prepare()
        self.spawn()
        self.wait_ready(timeout_s)

    def probe(self) -> None:
        """Ready means the broker answers a metadata request, not merely that the port is open."""
        from kafka import KafkaAdminClient  # imported late: only the producer extra ships kafka-python

        from btc_anomaly.monitoring.kafka_logging import waiting_for_kafka

        # Refused connections are what "not ready yet" looks like: not kafka-python ERROR lines.
        with waiting_for_kafka():
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
            try:
                admin.describe_cluster()
            finally:
                admin.close()

    def client_port(self) -> int:
        return self.port

    def exit_message(self, returncode: int) -> str:
        return f"kafka broker exited with {returncode}; see {self.log_dir}"

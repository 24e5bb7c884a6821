"""The one SparkSession of the streaming job: Kafka source + Delta Lake from the Maven-resolved jars.

No ``--packages`` and no network at run time: ``.jars/spark`` (``make jars``) holds the Kafka source,
Delta and their dependencies. Jars whose artifact PySpark already ships (jackson, hadoop, scala,
parquet, ...) are skipped, so exactly one copy of each library is on the classpath — two jacksons or two
scala-libraries fail in ways that only show up deep in a job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from btc_anomaly.config import Settings
from btc_anomaly.runtime.jars import artifact_name, jar_dir

if TYPE_CHECKING:
    from py4j.java_gateway import JavaGateway
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def pyspark_jars_dir() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "jars"


def extra_jars(jars_root: Path) -> list[Path]:
    """The jars of ``jars_root/spark`` whose artifact is not already in PySpark's own jars folder."""
    shipped = {artifact_name(j) for j in pyspark_jars_dir().glob("*.jar")}
    return sorted(j for j in jar_dir(jars_root, "spark").glob("*.jar") if artifact_name(j) not in shipped)


def session_conf(settings: Settings) -> dict[str, str]:
    """Spark configuration of the stream; a function of Settings only, so tests and the CLI agree."""
    jars = extra_jars(settings.jars_dir)
    parts = str(settings.spark_shuffle_partitions)
    return {
        "spark.jars": ",".join(str(j) for j in jars),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.driver.memory": settings.spark_driver_memory,
        # Date partitions and window boundaries must not depend on the host's time zone.
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": parts,
        # Delta rebuilds its file list after each commit with a shuffle into this many partitions
        # (default 50); the list is small (compacted files), one task is the quickest.
        "spark.databricks.delta.snapshotPartitions": "1",
        # MERGE would shuffle its output by the partition column first: with one date partition per
        # batch that funnels every row into one write task. Files per batch stay bounded by the
        # source partitions (and are compacted), writes use every core.
        "spark.databricks.delta.merge.repartitionBeforeWrite.enabled": "false",
        # The stream's compaction (sinks.compact) bin-packs files under 16 MB into files of up to 128 MB:
        # with the default (every file under 1 GB) each run would rewrite the whole day's partition.
        "spark.databricks.delta.optimize.minFileSize": str(16 << 20),
        "spark.databricks.delta.optimize.maxFileSize": str(128 << 20),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
        "spark.ui.enabled": "true" if settings.spark_ui else "false",
        "spark.ui.showConsoleProgress": "false",
        # Streaming state (window aggregates) in RocksDB: bounded JVM heap whatever the backlog.
        "spark.sql.streaming.stateStore.providerClass": (
            "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
        ),
        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
        "spark.sql.streaming.noDataMicroBatches.enabled": "true",
    }


def build_session(settings: Settings, app_name: str = "btc-anomaly-stream") -> SparkSession:
    """Get (or create) the process' SparkSession configured for Kafka + Delta from ``settings``.

    Only the first call in a process configures the JVM (master, memory, jars); later calls return the
    same session, which is what the test suite relies on for its one session per run.
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    # PySpark forks the JVM with this interpreter's environment; make sure workers use this venv too.
    os.environ.setdefault("PYSPARK_PYTHON", _python())
    if SparkContext._active_spark_context is None:
        conf = SparkConf().setMaster(settings.spark_master).setAppName(app_name)
        conf.setAll(list(session_conf(settings).items()))
        with _callers_sigint_handler():
            SparkContext(conf=conf, gateway=_own_session_gateway(conf))
    builder = SparkSession.builder.master(settings.spark_master).appName(app_name)
    for key, value in session_conf(settings).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.spark_log_level)
    quiet("org.apache.spark.rdd.MapPartitionsRDD")  # "locally checkpointed ... unpersisting": intended
    log.info("spark %s master=%s", spark.version, spark.sparkContext.master)
    return spark


def _own_session_gateway(conf: SparkConf) -> JavaGateway:
    """The py4j gateway JVM in a session (process group) of its own.

    A supervisor stops a process by signalling its whole group (honcho's SIGTERM in `make demo`, a
    terminal's Ctrl-C): in our group the JVM and Spark's Python workers would die at once, under
    running queries (Java stack traces, exit 1). Out of it, only the driver gets the signal and stops
    the queries, then the JVM (stream.run_stream). The JVM still dies with the driver: it exits when
    its stdin, a pipe from this process, closes."""
    from pyspark.java_gateway import launch_gateway

    return launch_gateway(conf, popen_kwargs={"start_new_session": True})


@contextlib.contextmanager
def _callers_sigint_handler() -> Iterator[None]:
    """Keep the caller's SIGINT handler over the SparkContext's creation.

    PySpark's SparkContext installs its own (in the main thread): cancel every job, then raise
    KeyboardInterrupt wherever the main thread is. A Ctrl-C then kills the stream's running
    micro-batches under it (Java InterruptedException traces, exit 130) instead of reaching the stream's
    handler, which stops the queries between batches like SIGTERM does (cli.stream)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# Spark's loggers that report each task a stop cancels ("Putting block ... failed due to exception
# TaskKilledException", "Lost task ... TaskKilled"): expected while the stream stops its queries.
CANCELLATION_LOGGERS = (
    "org.apache.spark.storage.BlockManager",
    "org.apache.spark.scheduler.TaskSetManager",
    "org.apache.spark.scheduler.DAGScheduler",
    "org.apache.spark.executor.Executor",
)


def quiet(*loggers: str) -> None:
    """Only ERROR and above from these loggers of the process' JVM (none yet: nothing to do)."""
    from pyspark import SparkContext

    jvm = SparkContext._jvm
    if jvm is None:
        return
    level = jvm.org.apache.logging.log4j.Level.ERROR
    for logger in loggers:
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(logger, level)


def _python() -> str:
    import sys

    return sys.executable

"""`btc-anomaly api` as a real subprocess for HTTP-level tests, plus data helpers for the API tests."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bitcoin.core import CTransaction

from btc_anomaly.config import PROJECT_ROOT

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@dataclass
class ApiServer:
    """One `python -m btc_anomaly.cli api` process (and its uvicorn workers) on 127.0.0.1:``port``."""

    port: int
    env: dict[str, str]
    workdir: Path
    workers: int = 1
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"api-{self.port}.log"

    def start(self, *, ready: bool = True, timeout_s: float = 180.0) -> ApiServer:
        """Start and wait for /health (and /ready when ``ready``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BTC_ANOMALY_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(self.env)
        cmd = [sys.executable, "-m", "btc_anomaly.cli", "api", "--port", str(self.port)]
        cmd += ["--workers", str(self.workers), "--log-level", "info"]
        with self.log_path.open("ab") as log:
            # Own session: stop() signals this server and the workers it spawned, nothing else.
            self._proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait("/ready" if ready else "/health", timeout_s)
        return self

    def wait(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"api exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url}{path} not 200 after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)


def api_env(**values: Any) -> dict[str, str]:
    """``BTC_ANOMALY_<NAME>`` variables from keyword arguments (Settings field names)."""
    return {f"BTC_ANOMALY_{k.upper()}": str(v) for k, v in values.items()}


# --- real data ----------------------------------------------------------------------------------------


def sample_records(limit: int | None = None) -> list[dict[str, Any]]:
    lines = gzip.decompress(SAMPLE.read_bytes()).splitlines()
    return [json.loads(line) for line in (lines[:limit] if limit else lines)]


def summary_body(record: dict[str, Any]) -> dict[str, Any]:
    """The original 8-field body of a canonical record."""
    return {
        "hash": record["hash"],
        "size": record["size"],
        "weight": record["weight"],
        "fee": record["fee"],
        "inputs_count": record["input_count"],
        "outputs_count": record["output_count"],
        "input_value": record["input_value"],
        "output_value": record["output_value"],
    }


def historical_cases() -> list[dict[str, Any]]:
    """Three real segwit/taproot mainnet transactions with their parents (tests/fixtures/SOURCES.md)."""
    return json.loads((FIXTURES / "transactions" / "authenticated-historical-transactions.json").read_text())


def rawtx_object(raw_hex: str) -> dict[str, Any]:
    """A real transaction in Blockchain.com's /rawtx shape, as far as prevout lookups read it.

    Built from the raw bytes: ``out[n].value`` and ``out[n].script`` are exactly what the API takes from it.
    """
    from btc_anomaly.ingestion.decode import decode_transaction

    tx = CTransaction.deserialize(bytes.fromhex(raw_hex))
    return {
        "hash": decode_transaction(raw_hex).hash,
        "ver": tx.nVersion,
        "vin_sz": len(tx.vin),
        "vout_sz": len(tx.vout),
        "out": [
            {"n": n, "value": out.nValue, "script": bytes(out.scriptPubKey).hex(), "type": 0}
            for n, out in enumerate(tx.vout)
        ],
    }


def coinbase_hex() -> str:
    """The coinbase of block 62,500 (tests/fixtures/blocks/js-bitcoin-block), as raw hex."""
    from bitcoin.core import CBlock

    path = next((FIXTURES / "blocks" / "js-bitcoin-block").glob("000000000424d2cd*.hex"))
    block = CBlock.deserialize(bytes.fromhex("".join(path.read_text().split())))
    return block.vtx[0].serialize().hex()


def core_valid_vectors(limit: int = 25) -> list[str]:
    """Serialized transactions from Bitcoin Core's tx_valid.json (consensus test vectors)."""
    rows = json.loads((FIXTURES / "transactions" / "bitcoin-core-vectors" / "tx_valid.json").read_text())
    return [r[1] for r in rows if isinstance(r, list) and len(r) == 3 and isinstance(r[1], str)][:limit]


def core_invalid_vectors(limit: int = 25) -> list[str]:
    rows = json.loads((FIXTURES / "transactions" / "bitcoin-core-vectors" / "tx_invalid.json").read_text())
    return [r[1] for r in rows if isinstance(r, list) and len(r) == 3 and isinstance(r[1], str)][:limit]


def write_scored_table(settings: Any, rescored: int = 20) -> Path:
    """``scored_transactions`` as the stream writes it: the sample scored by the champion (``score_frame``).

    The ``rescored`` highest-scored transactions are scored a second time, later, as the stream does when a
    transaction is seen again (confirmation); the API must answer with the latest row.
    """
    import pandas as pd
    import pyarrow as pa
    from deltalake import write_deltalake

    from btc_anomaly.model.scoring import load_champion, score_frame, scored_arrow_schema

    model = load_champion(settings)
    frame = pd.DataFrame(sample_records())
    scored = score_frame(frame, model, settings=settings)
    path = settings.lake_table("scored_transactions")
    schema = scored_arrow_schema()
    write_deltalake(
        str(path), pa.Table.from_pandas(scored, schema=schema, preserve_index=False), mode="overwrite"
    )
    top = scored.nlargest(rescored, "anomaly_score")["hash"]
    again = score_frame(frame[frame["hash"].isin(top)], model, settings=settings, explain="all")
    write_deltalake(
        str(path), pa.Table.from_pandas(again, schema=schema, preserve_index=False), mode="append"
    )
    return path


@functools.lru_cache(maxsize=1)
def sample_bundle() -> Any:
    """Both forests fit on the sample with the trainer's own ``fit_bundle`` (Settings defaults), once per process."""
    import pandas as pd

    from btc_anomaly.config import Settings
    from btc_anomaly.model.train import fit_transactions

    bundle, _ = fit_transactions(pd.DataFrame(sample_records()), Settings())
    bundle.warm_up()
    return bundle


def served_sample_model(name: str = "unit-model", version: str = "1") -> Any:
    """The sample bundle as the API serves a registry version (for in-process tests without MLflow)."""
    from btc_anomaly.api.model_holder import Served
    from btc_anomaly.model.scoring import ChampionModel

    model = ChampionModel(
        bundle=sample_bundle(), name=name, version=version, run_id=None, loaded_at=time.time()
    )
    return Served(model=model, tags={"promotion.status": "promoted", "promotion.reason": "unit test"})


@contextlib.contextmanager
def in_process_api(lake_root: Path, state_dir: Path, **overrides: Any) -> Iterator[Any]:
    """A TestClient of the app over ``lake_root`` serving the sample bundle, the registry down (nothing
    listens on port 9) and prevout lookups off; ``overrides`` are Settings fields."""
    from fastapi.testclient import TestClient

    from btc_anomaly.api.app import create_app
    from btc_anomaly.config import Settings

    values: dict[str, Any] = {
        "state_dir": state_dir,
        "lake_root": lake_root,
        "mlflow_tracking_uri": "http://127.0.0.1:9",
        "model_name": "unit-model",
        "api_resolve_prevouts": False,
    }
    app = create_app(Settings(**(values | overrides)), watch_model=False)
    app.state.ctx.holder.install(served_sample_model())
    with TestClient(app, base_url="http://localhost") as client:
        yield client

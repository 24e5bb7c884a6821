"""Block until a dependency of a Procfile process is up: `python scripts/wait_for.py kafka-topic`.

honcho starts every process of the Procfile at once and stops the whole stack when one exits, so a
process that would fail on a missing dependency waits for it here first (up to --timeout seconds).
"""

from __future__ import annotations

import argparse
import sys
import time

from btc_anomaly.config import get_settings


def topic_exists() -> bool:
    from kafka import KafkaAdminClient

    s = get_settings()
    admin = KafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=3000)
    try:
        return s.topic in set(admin.list_topics())
    finally:
        admin.close()


CHECKS = {"kafka-topic": topic_exists}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=sorted(CHECKS))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            if CHECKS[args.what]():
                return 0
        except Exception:  # the dependency is not up yet: any client error means "try again"
            pass
        time.sleep(1.0)
    print(f"wait_for: {args.what} not ready after {args.timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""A two-node Ray cluster on 127.0.0.1, run as a script by tests/test_executor_ray.py.

``ray start --address`` cannot add a second node to a loopback-only head (docs/executor.md:
refused with Ray's loopback switch on, moved to the outward address with it off), so the
nodes are started through Ray's own multi-node test utility, ``ray.cluster_utils.Cluster``:
a head (GCS, raylet, Ray Client server) and a second raylet with its own object store and
workers, both on 127.0.0.1. Prints ``READY <gcs address>``; SIGTERM shuts both down.

    python tests/ray_two_nodes.py CLIENT_PORT TEMP_DIR
"""

from __future__ import annotations

import os
import signal
import sys
import time

from hardening.executor.ray_backend import QUIET_ENV

for _k, _v in QUIET_ENV.items():
    os.environ.setdefault(_k, _v)

from ray.cluster_utils import Cluster  # noqa: E402


def main() -> None:
    port, temp = int(sys.argv[1]), sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "ray_client_server_port": port, "include_dashboard": False, "temp_dir": temp})
    cluster.add_node(num_cpus=1)

    def stop(*_: object) -> None:
        cluster.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("READY", cluster.address, flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()

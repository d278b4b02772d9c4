"""Run by tests/test_fault_recovery.py in a process of its own: a Ray cluster of several nodes on this
machine (ray.cluster_utils.Cluster), a training run whose worker must sit on node B (the only node
with a "trainer" slot), then node C joins and node B is removed mid-run. Prints the run's step
history as JSON. Only this cluster's processes are started and stopped."""

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from raydpo.config import build_config
from raydpo.methods import train

model_dir, out = sys.argv[1], Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
node_b = cluster.add_node(num_cpus=1, resources={"trainer": 1})
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address
cfg = build_config({
    "run_name": "node-loss", "model": {"policy": model_dir},
    "data": {"max_length": 48, "max_prompt_length": 24}, "optim": {"lr": 1e-3},
    "train": {"batch_size": 4, "max_steps": 8, "checkpoint_every": 2, "output_dir": str(out)},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1, "resources_per_worker": {"trainer": 1},
                "max_failures": 2},
    "tracking": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "n"},
})  # fmt: skip
result: dict = {}
errors: list[str] = []


def run() -> None:
    try:
        result.update(train(cfg, log=lambda *_: None, stream=None))
    except Exception as e:  # reported in the JSON, asserted by the test
        errors.append(f"{type(e).__name__}: {e}")


runner = threading.Thread(target=run)
runner.start()
spool = out / "node-loss" / "mlflow-spool.jsonl"
removed_at = None
while runner.is_alive():
    steps = [json.loads(x)["step"] for x in spool.read_text().splitlines()] if spool.is_file() else []
    if removed_at is None and len(steps) >= 3:
        cluster.add_node(num_cpus=1, resources={"trainer": 1})  # what is left after B goes
        cluster.wait_for_nodes()
        cluster.remove_node(node_b, allow_graceful=False)  # kills B's raylet and the worker on it
        removed_at = max(steps)
    time.sleep(0.2)
runner.join()
steps = [h["step"] for h in result.get("history", [])]
report = {"steps": steps, "removed_at": removed_at, "final": result.get("final_model"), "errors": errors}
print("RESULT " + json.dumps(report), flush=True)
ray.shutdown()  # this driver is connected to the head: leave it before the cluster goes
cluster.shutdown()

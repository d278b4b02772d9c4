"""Tracking is never a reason to stop training: metrics go through a spool on disk, survive an outage
of the tracking server longer than the client's retries, and reach MLflow exactly once."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raydpo.tracking import THROUGH_TAG, MetricSpool

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    """An MLflow server on 127.0.0.1 with a SQLite store, in a process group of its own."""
    db, art = f"sqlite:///{root / 'mlflow.db'}", str(root / "art")
    store = ["--backend-store-uri", db, "--default-artifact-root", art]
    cmd = [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *store]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.time() + 90
    while time.time() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError("mlflow server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    """Kill exactly the server's process group (it was started in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def wait_for(pred, timeout: float = 30.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if pred():
                return True
        except Exception:  # a slow or restarting server: ask again
            pass
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_outage_longer_than_retries_delays_metrics_and_replays_are_not_logged_twice(tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("spool")).info.run_id
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client gives up at once...
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        spool = MetricSpool(uri, run_id, tmp_path / "run" / "mlflow-spool.jsonl")
        for step in (1, 2, 3):
            spool.put({"loss": step / 10}, step)
        assert wait_for(lambda: client.get_run(run_id).data.tags.get(THROUGH_TAG) == "3")

        stop_server(server)  # ...and the server stays down for longer than that
        t0 = time.monotonic()
        for step in (4, 5, 6, 7, 8):
            spool.put({"loss": step / 10}, step)
        assert time.monotonic() - t0 < 1.0  # training is never held up by the store
        assert wait_for(lambda: spool.unsent_error is not None, 20)  # it did try, and failed
        time.sleep(3)
        server = start_server(tmp_path, port)
        assert spool.close(60) == 0  # everything went out once the server was back

        # A worker restarted from the step-5 checkpoint replays steps 6-8 (here with other values,
        # to see which ones land): the store keeps the first copy of each step, and only it.
        replay = MetricSpool(uri, run_id, tmp_path / "run" / "mlflow-spool.jsonl")
        for step in (6, 7, 8, 9):
            replay.put({"loss": step / 10 + 5}, step)
        assert replay.close(30) == 0
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert history == [(s, s / 10) for s in range(1, 9)] + [(9, 9 / 10 + 5)]
    finally:
        stop_server(server)


def test_a_torn_spool_line_is_skipped_and_the_rest_is_sent(tmp_path):
    """A writer killed mid-line leaves a torn line; the sender skips it and sends the others."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("torn")).info.run_id
    path = tmp_path / "spool.jsonl"
    path.write_text('{"step": 1, "ts": 1000, "m": {"loss": 0.5}}\n{"step": 2, "ts": 20\n')
    spool = MetricSpool(uri, run_id, path)
    spool.put({"loss": 0.3}, 3)
    assert spool.close(30) == 0
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [
        (1, 0.5),
        (3, 0.3),
    ]


def test_rank_zero_makes_its_mlflow_clients_in_background_threads(tmp_path, monkeypatch):
    """A training worker's rank 0 builds its RunLogger (spool and system metrics) without making an MLflow
    client in its own thread: the import and the store's opening never delay the first step."""
    from raydpo import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("lazy")).info.run_id
    made_in, new_client = [], tracking._new_client

    def recorded(u):
        made_in.append(threading.current_thread())
        return new_client(u)

    monkeypatch.setattr(tracking, "_new_client", recorded)
    logger = tracking.RunLogger(uri, run_id, tmp_path / "spool.jsonl")
    logger.start_system_metrics(0.05)
    logger.log_metrics({"loss": 0.5}, 1)
    assert wait_for(lambda: len(made_in) >= 2, 30)  # the spool's sender and the sampler, each its own
    assert threading.current_thread() not in made_in
    logger.close()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5)]
    assert client.get_metric_history(run_id, "system/process_rss_megabytes")
    assert logger._client is None  # nothing this thread logged needed one


def test_open_store_runs_ahead_and_clients_wait_for_it(tmp_path, monkeypatch):
    """`open_store` opens the store in a thread (the driver calls it while Ray starts); a client asked for
    meanwhile waits for it, and an error there is raised by the first client, not lost."""
    from raydpo import tracking

    monkeypatch.setattr(tracking, "_READY", set())
    events, new_client = [], tracking._new_client

    def slow(u):
        events.append(("start", threading.current_thread().name))
        time.sleep(0.5)
        events.append(("end", threading.current_thread().name))
        return new_client(u)

    monkeypatch.setattr(tracking, "_new_client", slow)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.open_store(uri)
    time.sleep(0.1)
    assert tracking._client(uri).search_experiments()
    assert events[:2] == [("start", "raydpo-open-store"), ("end", "raydpo-open-store")]
    assert events[2:] == [("start", "MainThread"), ("end", "MainThread")]

    def broken(u):
        raise RuntimeError(f"cannot open {u}")

    monkeypatch.setattr(tracking, "_new_client", broken)
    tracking.open_store("sqlite:///elsewhere.db")  # no exception here...
    with pytest.raises(RuntimeError, match="cannot open sqlite:///elsewhere.db"):
        tracking._client("sqlite:///elsewhere.db")  # ...but here


def test_threads_that_start_using_mlflow_at_once_take_turns(tmp_path, monkeypatch):
    """MLflow imports modules on first use; the first use of a store in a process (`_ready`) happens
    once, in one thread, while the others wait (two at once can fail with "partially initialized
    module"). Then a sampler whose store is down loses samples and never raises."""
    from raydpo import tracking

    monkeypatch.setattr(tracking, "_READY", set())
    inside, most, new_client = [0], [0], tracking._new_client

    def counted(u):
        if u in tracking._READY:  # opened: clients made at once from here on are fine
            return new_client(u)
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        inside[0] -= 1
        return new_client(u)

    monkeypatch.setattr(tracking, "_new_client", counted)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=lambda: (barrier.wait(), tracking._client(uri))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and uri in tracking._READY

    def down(u):
        raise ConnectionError("store down")

    monkeypatch.setattr(tracking, "_new_client", down)
    sampler = tracking._SystemMetrics("sqlite:///down.db", "run", 0.05)
    time.sleep(0.2)
    sampler.stop()  # no exception
    assert sampler.step == 0

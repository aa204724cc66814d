"""`zumik bench routing`'s CPU accounting: processes grouped by serving component from the titles
Ray, Serve and vLLM give them, and CPU differences between two snapshots."""

from __future__ import annotations

import os

from zumik_serve.bench.cpu_share import Sample, component, delta, per_request_ms, snapshot, table_rows


def test_processes_are_named_by_the_component_their_title_shows() -> None:
    assert component("ray::ServeReplica:zumik:Gateway.handle_request") == "serve replica Gateway"
    assert component("ray::ServeReplica:zumik:EngineGroup") == "serve replica EngineGroup"
    assert component("VLLM::EngineCore") == "vllm engine core"
    assert component("ray::ProxyActor") == "serve proxy"
    assert component("ray::SchedulerOwner.report") == "ray SchedulerOwner"
    assert component("/usr/bin/redis-server 127.0.0.1:6379") == "redis"
    assert component("/opt/ray/core/src/ray/gcs/gcs_server --port 0") == "ray system"
    assert component("/usr/bin/python3 something_else.py") is None


def test_the_delta_counts_what_each_component_used_meanwhile() -> None:
    before = {
        1: Sample("ray::ServeReplica:app:Gateway", 10.0, 100.0),
        2: Sample("VLLM::EngineCore", 5.0, 100.0),
        6: Sample("ray::ServeController.run_control_loop", 40.0, 90.0),
        7: Sample("ray::SchedulerOwner", 3.0, 90.0),
    }
    after = {
        1: Sample("ray::ServeReplica:app:Gateway.call", 21.0, 100.0),  # its title moved on
        2: Sample("VLLM::EngineCore", 7.5, 100.0),
        3: Sample("VLLM::EngineCore", 1.0, 150.0),  # started meanwhile
        4: Sample("bench client", 0.5),
        5: Sample("bash", 9.0),  # not the stack's
        6: Sample("ray::ServeController.listen_for_change", 40.5, 90.0),  # the method it runs now
        7: Sample("ray::SchedulerOwner", 2.0, 160.0),  # another process with the same pid
    }
    used = delta(before, after)
    assert used == {
        "serve replica Gateway": 11.0, "vllm engine core": 3.5, "ray SchedulerOwner": 2.0,
        "bench client": 0.5, "serve controller": 0.5,
    }  # fmt: skip
    assert list(used)[:2] == ["serve replica Gateway", "vllm engine core"]
    assert per_request_ms(used, 100)["vllm engine core"] == 35.0
    rows = table_rows({"rr-cache": {"vllm engine core": 30.0}, "zumik": {"vllm engine core": 31.0, "x": 2.0}})
    assert rows[0] == ("vllm engine core", "30.0", "31.0") and rows[-1] == ("total", "30.0", "33.0")


def test_a_snapshot_sees_this_process_as_the_client() -> None:
    sample = snapshot()[os.getpid()]
    assert sample.title == "bench client" and sample.cpu_s > 0

"""`cloudach up` checks every port it will bind before it starts anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tools.launcher.ports import free_ports, port_taken
from tools.launcher.stack import taken_ports
from tools.settings import StackSettings


def _free_settings() -> StackSettings:
    ports = free_ports(8)
    return StackSettings(port=ports[0], inference_port=ports[1], auth_port=ports[2], billing_port=ports[3],
                         inference_metrics_port=ports[4], auth_metrics_port=ports[5], billing_metrics_port=ports[6],
                         edge_metrics_port=ports[7])


def test_a_taken_port_is_one_line_naming_the_option_and_variable_to_change():
    settings = _free_settings()
    assert taken_ports(settings) == []
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", settings.auth_port))
        holder.listen()
        assert port_taken(settings.auth_port)
        assert taken_ports(settings) == [
            f"port {settings.auth_port} (auth_svc) is already in use on 127.0.0.1: "
            "choose another with --auth-port or CLOUDACH_AUTH_PORT"]
    assert not port_taken(settings.auth_port)


def test_metrics_ports_are_checked_too_and_unserved_ones_are_not():
    settings = _free_settings()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", settings.inference_metrics_port))
        holder.listen()
        [line] = taken_ports(settings)
        assert line.endswith("choose another with CLOUDACH_INFERENCE_METRICS_PORT")
    unserved = StackSettings(inference_metrics_port=-1, auth_metrics_port=0)
    assert "inference_metrics_port" not in unserved.ports() and "auth_metrics_port" not in unserved.ports()


def test_settings_come_from_the_environment_and_options_override_them():
    from cloudach.config import from_env  # what StackSettings.from_env reads, given an environment

    env = {"CLOUDACH_PORT": "9999", "CLOUDACH_AUTH_PORT": "6000"}
    read = from_env(StackSettings, env)
    assert (read.port, read.auth_port, read.inference_port) == (9999, 6000, 50051)
    assert read.with_options(port=7000, auth_port=None).port == 7000


def test_up_with_the_api_port_taken_starts_nothing(tmp_path):
    settings = _free_settings()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", settings.port))
        holder.listen()
        env = {**os.environ, **{f"CLOUDACH_{n}_METRICS_PORT": str(getattr(settings, f"{n.lower()}_metrics_port"))
                                for n in ("EDGE", "INFERENCE", "AUTH", "BILLING")}}
        done = subprocess.run(
            [sys.executable, "-m", "tools", "up", "--state-dir", str(tmp_path / "state"), "--port", str(settings.port),
             "--inference-port", str(settings.inference_port), "--auth-port", str(settings.auth_port),
             "--billing-port", str(settings.billing_port)],
            capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"!! port {settings.port} (the HTTP API) is already in use on 127.0.0.1: "
                                   "choose another with --port or CLOUDACH_PORT")
    assert "starting" not in done.stdout and not (tmp_path / "state").exists()


def test_free_ports_can_leave_out_ports_chosen_earlier():
    chosen = free_ports(7)
    # Released, the same ports are free again; the next pick must not hand one of them out twice.
    assert not set(free_ports(50, avoid=chosen)) & set(chosen)

"""deploy/k8s, checked without a cluster: each overlay rendered by kubectl's kustomize, every
object validated offline against the Kubernetes API schemas (kubernetes-validate), and each
promise the manifests make asserted on what they render to."""

from __future__ import annotations

import functools
import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from edge.config import EdgeConfig
from inference_svc.config import InferenceConfig
from tools.launcher.serve_triton import EXIT_TIMEOUT_S as TRITON_EXIT_TIMEOUT_S
from tools.launcher.stack import PYTHON_SERVICES

REPO = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBECTL = pathlib.Path(sys.executable).parent / "kubectl"
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = ("cpu", "gpu")
#: the custom resources (Prometheus Operator) the API schemas do not cover
CUSTOM = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
#: the Deployment behind each Python service
DEPLOYMENT_OF = {"auth_svc": "auth", "billing_svc": "billing", "inference_svc": "inference", "edge": "edge"}


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(o for o in yaml.safe_load_all(out.stdout) if o)


def of_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_api_schemas(overlay):
    objects = rendered(overlay)
    assert {"Deployment", "Service", "ConfigMap", "Job", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "Namespace", "PodMonitor", "PrometheusRule"} <= {o["kind"] for o in objects}
    for o in objects:
        if (o["apiVersion"], o["kind"]) in CUSTOM:
            assert o["spec"], o["metadata"]["name"]
            continue
        kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)  # raises on any error
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "cloudach", o["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_probed_non_root_and_bounded(overlay):
    for name, d in of_kind(rendered(overlay), "Deployment").items():
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] >= 1000, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            assert c["readinessProbe"] and c["livenessProbe"], name
            assert c["resources"]["requests"] and c["resources"]["limits"], name
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], name
            # Read-only everywhere Triton is not (its backend writes caches beside its code).
            assert security["readOnlyRootFilesystem"] is (name != "triton"), name
    job = of_kind(rendered(overlay), "Job")["migrate"]["spec"]["template"]["spec"]
    assert job["securityContext"]["runAsNonRoot"] and job["containers"][0]["securityContext"]["readOnlyRootFilesystem"]


def test_triton_gets_a_gpu_on_gpu_nodes_and_time_to_load_only_in_the_gpu_overlay():
    gpu = of_kind(rendered("gpu"), "Deployment")["triton"]["spec"]["template"]["spec"]
    container = gpu["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a model load of minutes
    assert {"name": "checkpoint", "mountPath": "/models/llama3-8b", "readOnly": True} in container["volumeMounts"]
    assert container["image"].startswith("cloudach/triton-trtllm:")
    cpu = of_kind(rendered("cpu"), "Deployment")
    assert "nvidia.com" not in yaml.safe_dump([cpu[n] for n in cpu])
    assert cpu["triton"]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("cloudach/triton-cpu:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_multi_replica_deployment_has_a_disruption_budget(overlay):
    objects = rendered(overlay)
    budgets = of_kind(objects, "PodDisruptionBudget").values()
    scaled = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
              for h in of_kind(objects, "HorizontalPodAutoscaler").values()}
    for name, d in of_kind(objects, "Deployment").items():
        if "replicas" in d["spec"]:
            assert name not in scaled, f"{name}: an HPA owns its replicas, a re-apply must not reset them"
        if scaled.get(name, d["spec"].get("replicas", 1)) > 1:
            assert any(b["spec"]["selector"]["matchLabels"].items() <= pod_labels(d).items() and
                       b["spec"].get("minAvailable", 0) >= 1 for b in budgets), name


def _selects(selector: dict, labels: dict) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", ()) if e["operator"] == "In")


def _admits(policies, source: dict | None, target: dict, port: int) -> bool:
    """Whether some policy lets source's pods (None: outside the cluster) reach target's pods on port."""
    for p in policies:
        if not _selects(p["spec"]["podSelector"], target):
            continue
        for rule in p["spec"].get("ingress", ()):
            if not any(q["port"] == port for q in rule.get("ports", [{"port": port}])):
                continue
            peers = rule.get("from")
            if peers is None or (source is not None and any(
                    "podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], source)
                    for peer in peers)):
                return True
    return False


def test_the_network_policies_let_only_the_edge_in_and_each_backend_only_its_callers():
    objects = rendered("cpu")
    policies = of_kind(objects, "NetworkPolicy").values()
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies)  # default deny
    pods = {name: pod_labels(d) for name, d in of_kind(objects, "Deployment").items()}
    ports = {"edge": 8080, "auth": 50052, "billing": 50053, "inference": 50051, "triton": 8001}
    allowed = {(source, target) for target in pods for source in (None, *pods)
               if _admits(policies, pods.get(source), pods[target], ports[target])}
    assert allowed == {
        *((s, "edge") for s in (None, *pods)),
        ("edge", "auth"), ("billing", "auth"), ("inference", "auth"),
        ("edge", "billing"), ("inference", "billing"),
        ("edge", "inference"),
        ("inference", "triton"),
    }


def test_streams_get_their_drain_grace_before_the_pod_is_killed():
    deployments = of_kind(rendered("gpu"), "Deployment")
    for name, grace in (("edge", EdgeConfig().shutdown_grace_s + EdgeConfig().outbox_flush_s + 10),
                        ("inference", InferenceConfig().shutdown_grace_s), ("triton", TRITON_EXIT_TIMEOUT_S)):
        assert deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + 10, name


def test_the_hpa_metrics_are_the_ones_the_rules_record_and_the_adapter_serves():
    objects = rendered("gpu")
    hpa = of_kind(objects, "HorizontalPodAutoscaler")
    [metric] = hpa["triton"]["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    [rule] = [r for group in of_kind(objects, "PrometheusRule")["triton-autoscaling"]["spec"]["groups"]
              for r in group["rules"]]
    assert rule["record"] == name
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    [custom] = adapter["rules"]["custom"]
    assert custom["name"]["as"] == name and custom["seriesQuery"].startswith(name + "{")
    # The rule's inputs are Triton's own metric names (tests/integration/test_triton_configs.py
    # finds them in a real Triton's /metrics).
    assert set(re.findall(r"cloudach_model_\w+", rule["expr"])) == set(TRITON_AUTOSCALING_INPUTS)
    assert hpa["edge"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"


#: what Triton (our model, through Triton's metrics port) must export for its autoscaling rule
TRITON_AUTOSCALING_INPUTS = ("cloudach_model_queued_requests", "cloudach_model_active_requests")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_monitor_target_has_a_metrics_port(overlay):
    objects = rendered(overlay)
    [monitor] = of_kind(objects, "PodMonitor").values()
    [selector] = monitor["spec"]["selector"]["matchExpressions"]
    for name, d in of_kind(objects, "Deployment").items():
        assert name in selector["values"], name
        assert "metrics" in {p["name"] for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}, name


def _settings_in_code() -> set[str]:
    names: set[str] = set()
    for path in REPO.glob("*/**/*.py"):
        if ".venv" not in path.parts:
            names.update(re.findall(r'"(CLOUDACH_[A-Z0-9_]+)"', path.read_text()))
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_settings_are_ones_the_code_reads_and_their_ports_are_the_containers(overlay):
    objects = rendered(overlay)
    env = of_kind(objects, "ConfigMap")["cloudach-env"]["data"]
    known = _settings_in_code()
    assert set(env) <= known, set(env) - known
    deployments = of_kind(objects, "Deployment")
    for service, variable in (("auth", "CLOUDACH_AUTH_LISTEN"), ("billing", "CLOUDACH_BILLING_LISTEN"),
                              ("inference", "CLOUDACH_INFERENCE_LISTEN")):
        port = int(env[variable].rsplit(":", 1)[1])
        container = deployments[service]["spec"]["template"]["spec"]["containers"][0]
        assert port in {p["containerPort"] for p in container["ports"]} and container["readinessProbe"]["grpc"]["port"] == port
    for variable in ("CLOUDACH_AUTH_TARGET", "CLOUDACH_BILLING_TARGET", "CLOUDACH_INFERENCE_TARGET"):
        host, port = env[variable].removeprefix("dns:///").rsplit(":", 1)
        service = of_kind(objects, "Service")[host.split(".")[0]]
        assert service["spec"]["clusterIP"] == "None" and int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_the_config_maps_files_are_the_repositorys_own():
    assert (K8S / "base" / "prices.toml").read_text() == (REPO / "deploy" / "billing" / "prices.toml").read_text()
    for overlay, registry in (("cpu", "models.cpu.toml"), ("gpu", "models.trtllm.toml")):
        assert (K8S / "overlays" / overlay / "models.toml").read_text() == \
            (REPO / "deploy" / "inference" / registry).read_text()


def test_each_service_container_runs_what_the_launcher_runs():
    """The services image's ENTRYPOINT with a Deployment's args is the launcher's command line."""
    from tests.unit.test_deploy_images import entrypoint
    from tools.launcher.stack import service_argv

    assert set(DEPLOYMENT_OF) == set(PYTHON_SERVICES)
    deployments = of_kind(rendered("cpu"), "Deployment")
    for service, name in DEPLOYMENT_OF.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["image"].startswith("cloudach/services:")
        assert "command" not in container
        assert [*entrypoint("services.Dockerfile"), *container["args"]] == service_argv(service, python="python")
    job = of_kind(rendered("cpu"), "Job")["migrate"]["spec"]["template"]["spec"]["containers"][0]
    assert [*entrypoint("services.Dockerfile"), *job["args"]] == ["python", "-m", "tools", "migrate"]

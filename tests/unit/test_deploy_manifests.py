"""deploy/: the Kubernetes manifests against the real Kubernetes schemas (the ``kubernetes`` client's models,
offline: every key must be a field of its model, every value of its type, every required field there), the
CRDs (PyTorchJob, JobSet, PodMonitor) by their structure around the pod templates they hold; the sidecar's
arguments parse with the real CLI; the Slurm example passes ``bash -n`` and points every rank at its sidecar.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from trainhealth.cli import build_parser

from tests.conftest import IN_CI, ROOT

if IN_CI:
    from kubernetes.client import ApiClient, models
else:
    kubernetes = pytest.importorskip("kubernetes", reason="the dev extra's kubernetes client")
    from kubernetes.client import ApiClient, models

KUBE = ROOT / "deploy" / "kubernetes"
SLURM = ROOT / "deploy" / "slurm" / "trainhealth.sbatch"
PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
                                           "object": (object,), "datetime": (str,), "date": (str,)}


def strict(value: Any, kind: str, where: str) -> None:
    """``value`` (parsed YAML) is a valid ``kind`` (a model name or the client's List[...]/Dict[...] types):
    no key the model does not have, every value of its field's type."""
    m = re.fullmatch(r"(?:list|List)\[(.+)\]", kind)
    if m:
        assert isinstance(value, list), f"{where}: expected a list, got {value!r:.80}"
        for i, item in enumerate(value):
            strict(item, m.group(1), f"{where}[{i}]")
        return
    m = re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", kind)
    if m:
        assert isinstance(value, dict), f"{where}: expected a mapping, got {value!r:.80}"
        for key, item in value.items():
            strict(item, m.group(1) or m.group(2), f"{where}.{key}")
        return
    if kind in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
        assert ok, f"{where}: expected {kind}, got {value!r:.80}"
        return
    model = getattr(models, kind)
    assert isinstance(value, dict), f"{where}: expected a {kind} mapping, got {value!r:.80}"
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    for key, item in value.items():
        assert key in fields, f"{where}: {key!r} is not a field of {kind} (fields: {sorted(fields)})"
        strict(item, model.openapi_types[fields[key]], f"{where}.{key}")
    ApiClient()._ApiClient__deserialize(value, kind)  # required fields and enums: the model's own checks


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def only_keys(value: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(value) - allowed
    assert not unknown, f"{where}: unknown keys {sorted(unknown)} (known: {sorted(allowed)})"


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def check_sidecar(pod: dict[str, Any], where: str) -> dict[str, Any]:
    """The sidecar beside the trainer: a native sidecar, token from the Secret, liveness on /healthz, and
    arguments the real CLI takes."""
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "trainhealth"]
    assert sidecar["restartPolicy"] == "Always", f"{where}: not a native sidecar (the pod would never complete)"
    assert env_of(sidecar)["TRAINHEALTH_TOKEN"] == {"secretKeyRef": {"name": "trainhealth", "key": "token"}}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9464} in sidecar["ports"]
    args = build_parser().parse_args(sidecar["args"])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 9464)
    return sidecar


def test_the_token_secret_is_a_valid_secret():
    (secret,) = documents("secret.yaml")
    strict(secret, "V1Secret", "secret.yaml")
    assert (secret["metadata"]["name"], set(secret["stringData"])) == ("trainhealth", {"token"})


def test_the_pytorchjob_has_one_sidecar_for_the_job_in_its_master_pod():
    (job,) = documents("pytorchjob-per-job.yaml")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    only_keys(job, {"apiVersion", "kind", "metadata", "spec"}, "PyTorchJob")
    strict(job["metadata"], "V1ObjectMeta", "PyTorchJob.metadata")
    only_keys(job["spec"], {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}, "spec")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    for role, spec in specs.items():
        only_keys(spec, {"replicas", "restartPolicy", "template"}, role)
        assert spec["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        strict(spec["template"], "V1PodTemplateSpec", f"{role}.template")
        (trainer,) = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "pytorch"]  # the operator's
        env = env_of(trainer)
        assert env["TRAINHEALTH_URL"] == "http://{master}:9464", role  # every rank: the master's sidecar
        assert env["TRAINHEALTH_TOKEN"] == {"secretKeyRef": {"name": "trainhealth", "key": "token"}}
        assert env["TRAINHEALTH_NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    check_sidecar(specs["Master"]["template"], "Master")
    assert "initContainers" not in specs["Worker"]["template"]["spec"]  # one sidecar for the job
    annotations = specs["Master"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "9464")


def test_the_jobset_has_a_sidecar_on_every_node_labelled_with_its_node():
    (jobset,) = documents("jobset-per-node.yaml")
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    only_keys(jobset, {"apiVersion", "kind", "metadata", "spec"}, "JobSet")
    strict(jobset["metadata"], "V1ObjectMeta", "JobSet.metadata")
    only_keys(jobset["spec"], {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy",
                               "suspend", "coordinator", "managedBy", "ttlSecondsAfterFinished"}, "spec")
    (workers,) = jobset["spec"]["replicatedJobs"]
    only_keys(workers, {"name", "replicas", "template", "dependsOn"}, "replicatedJobs[0]")
    strict(workers["template"], "V1JobTemplateSpec", "workers.template")
    pod = workers["template"]["spec"]["template"]
    sidecar = check_sidecar(pod, "workers")
    assert "--alertmanager" in sidecar["args"]
    assert env_of(sidecar)["TRAINHEALTH_NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}  # its pushes' node
    (trainer,) = pod["spec"]["containers"]
    assert env_of(trainer)["TRAINHEALTH_URL"] == "http://127.0.0.1:9464"  # each node's ranks: their own sidecar
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "trainhealth"  # what the PodMonitor selects


def test_the_podmonitor_scrapes_the_sidecars_with_the_token():
    (monitor,) = documents("podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    only_keys(monitor["spec"], {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                                "podTargetLabels", "sampleLimit", "targetLimit"}, "spec")
    strict(monitor["spec"]["selector"], "V1LabelSelector", "spec.selector")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    only_keys(endpoint, {"port", "path", "interval", "scrapeTimeout", "scheme", "params", "honorLabels",
                         "authorization", "relabelings", "metricRelabelings", "tlsConfig", "basicAuth"}, "endpoint")
    strict(endpoint["authorization"]["credentials"], "V1SecretKeySelector", "authorization.credentials")
    assert endpoint["authorization"]["credentials"] == {"name": "trainhealth", "key": "token"}
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert {"targetLabel": "job", "replacement": "trainhealth"} in endpoint["relabelings"]  # what the rules select


@pytest.mark.parametrize("bad, message", [
    ({"spec": {"containers": [{"name": "x", "imagePullPolicy": "Always", "imagee": "y"}]}}, "'imagee' is not a field"),
    ({"spec": {"containers": [{"name": "x", "ports": [{"containerPort": "9464"}]}]}}, "expected int"),
    ({"spec": {"containers": [{"image": "y"}]}}, "name"),
])
def test_the_schema_check_refuses_what_kubernetes_would(bad, message):
    with pytest.raises((AssertionError, ValueError), match=message):
        strict(bad, "V1PodTemplateSpec", "bad")


def test_the_slurm_example_starts_a_sidecar_and_points_every_rank_at_it():
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(SLURM)], check=True)
    text = SLURM.read_text()
    assert "#SBATCH --nodes=" in text
    srun = [line for line in text.splitlines() if line.lstrip().startswith("srun")]
    assert len(srun) == 2, srun  # the sidecar(s) in the background, then the ranks
    (args_line,) = re.findall(r"^SIDECAR_ARGS=\((.*)\)", text, flags=re.M)
    args = build_parser().parse_args(shlex.split(args_line))
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 9464)
    urls = re.findall(r'export TRAINHEALTH_URL="(.*)"', text)
    assert urls == ["http://{master}:$PORT", "http://127.0.0.1:$PORT"]  # per job, per node
    assert "export TRAINHEALTH_TOKEN=" in text and "MASTER_ADDR=$(scontrol show hostnames" in text

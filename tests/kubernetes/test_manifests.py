"""The manifests in nodes/kubernetes: rendered by ``kubectl kustomize``, every document
validated against the Kubernetes schemas (kubernetes-validate, strict: an unknown or
misspelt field fails), and the properties the issue asks for checked on what renders."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

import kubernetes_validate
import pytest

from tests.kubernetes import manifests
from zmesh.config import load_config, parse_hostport

pytestmark = pytest.mark.skipif(manifests.unavailable() is not None, reason=manifests.unavailable() or "")

# Native sidecars (an init container with restartPolicy: Always) are in the schema from
# 1.28 and on by default from 1.29; the newest schema the validator ships is checked too.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


@pytest.fixture(scope="module", params=manifests.OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return manifests.render(request.param)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_document_validates(rendered: list[dict[str, Any]], version: str) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check above is worth something: a misspelt field and a native sidecar against a
    schema from before native sidecars both fail."""
    docs = manifests.render("statefulset")
    bad = copy.deepcopy(manifests.workload(docs))
    bad["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifests.workload(docs), "1.27.0", strict=True)


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(manifests.by_kind(docs, "ConfigMap")["data"]["node.toml"])


def test_the_sidecar_config_loads_in_certificate_mode(rendered: list[dict[str, Any]], tmp_path: Any) -> None:
    path = tmp_path / "node.toml"
    path.write_text(manifests.by_kind(rendered, "ConfigMap")["data"]["node.toml"])
    config = load_config(path, {"node.name": "pod-0", "discovery.dns_name": "zmesh.ns.svc.cluster.local"})
    assert config.mesh.events_port and config.mesh.jobs_port  # fixed, for the NetworkPolicy
    assert config.http.listen is not None
    assert config.shutdown_grace < manifests.workload(rendered)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Admitted by certificate: an authority and a group signer; no key file, no trusted
    # directory (a pod's key is made in memory at start).
    assert config.mesh.authority is not None and config.mesh.signer is not None
    assert config.mesh.cert is None and config.mesh.trusted is None and config.mesh.certificate is None
    # The paths the config names are where the sidecar mounts the ConfigMap and the Secret.
    spec = manifests.workload(rendered)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in manifests.sidecar(spec)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert str(config.mesh.authority.parent) == mounts["authority"]
    assert volumes["authority"]["configMap"]["name"] == "zmesh-authority"
    assert str(config.mesh.signer.parent) == mounts["signer"]
    assert volumes["signer"]["secret"]["secretName"] == "zmesh-signer-scanner"


def test_the_sidecar_is_native_and_the_app_talks_to_localhost(rendered: list[dict[str, Any]]) -> None:
    spec = manifests.workload(rendered)["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["zmesh"], "the sidecar alone: no identity step before it"
    sidecar = manifests.sidecar(spec)
    assert sidecar["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert parse_hostport(_config(rendered)["mqtt"]["listen"]) == ("127.0.0.1", 1883)
    assert "127.0.0.1" in spec["containers"][0]["args"]


def test_one_group_signer_in_the_sidecar_only_and_no_per_pod_keys(rendered: list[dict[str, Any]]) -> None:
    """The only secret a pod holds is its group's signer, read-only and in the zmesh sidecar
    alone: the app cannot read it, and no Secret carries a key per pod."""
    spec = manifests.workload(rendered)["spec"]["template"]["spec"]
    secrets = [v for v in spec["volumes"] if "secret" in v or "projected" in v]
    assert [v["name"] for v in secrets] == ["signer"]
    assert [s["secret"]["secretName"] for s in secrets] == ["zmesh-signer-scanner"]
    containers = spec["initContainers"] + spec["containers"]
    mounted = [(c["name"], m.get("readOnly")) for c in containers for m in c.get("volumeMounts", [])
               if m["name"] == "signer"]
    assert mounted == [("zmesh", True)]
    assert not any(d["kind"] == "Secret" for d in rendered), "the manifests ship no Secret"
    assert "zmesh-keys" not in str(rendered) and "key_secret" not in str(rendered)
    assert all(c["name"] != "identity" for c in containers)


def test_every_container_is_locked_down(rendered: list[dict[str, Any]]) -> None:
    spec = manifests.workload(rendered)["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in spec["initContainers"] + spec["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
        assert container["resources"]["requests"], container["name"]


def test_probes_use_the_http_listener(rendered: list[dict[str, Any]]) -> None:
    sidecar = manifests.sidecar(manifests.workload(rendered)["spec"]["template"]["spec"])
    http_port = parse_hostport(_config(rendered)["http"]["listen"])[1]
    assert {"name": "http", "containerPort": http_port} in sidecar["ports"]
    paths = {probe: sidecar[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert all(sidecar[p]["httpGet"]["port"] == "http" for p in paths)


def test_the_service_and_network_policy_name_the_fixed_ports(rendered: list[dict[str, Any]]) -> None:
    config = _config(rendered)["mesh"]
    control = parse_hostport(config["listen"])[1]
    # The identity socket (certificate mode, mesh.authority) takes control + 1 by default.
    mesh_ports = {control, config.get("identity_port") or control + 1, config["events_port"], config["jobs_port"]}
    assert len(mesh_ports) == 4
    service = manifests.by_kind(rendered, "Service")["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert {"name": "zmesh", "port": parse_hostport(config["listen"])[1]}.items() <= service["ports"][0].items()
    policy = manifests.by_kind(rendered, "NetworkPolicy")["spec"]
    assert {p["port"] for p in policy["ingress"][0]["ports"]} == mesh_ports
    assert {p["port"] for p in policy["egress"][0]["ports"]} == mesh_ports
    sidecar = manifests.sidecar(manifests.workload(rendered)["spec"]["template"]["spec"])
    assert mesh_ports <= {p["containerPort"] for p in sidecar["ports"]}
    labels = manifests.workload(rendered)["spec"]["template"]["metadata"]["labels"]
    for selector in (service["selector"], policy["podSelector"]["matchLabels"],
                     manifests.by_kind(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def test_deployment_and_statefulset_run_the_same_pod() -> None:
    """The two workloads are two files (kustomize cannot turn one kind into another): the
    pods must not drift apart, apart from where data_dir lives."""
    pods = {}
    for overlay in manifests.OVERLAYS:
        spec = copy.deepcopy(manifests.workload(manifests.render(overlay))["spec"]["template"])
        spec["spec"]["volumes"] = [v for v in spec["spec"]["volumes"] if v["name"] != "data"]
        pods[overlay] = spec
    assert pods["deployment"] == pods["statefulset"]
    sts = manifests.workload(manifests.render("statefulset"))
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert sts["spec"]["serviceName"] == manifests.by_kind(manifests.render("statefulset"), "Service")["metadata"]["name"]

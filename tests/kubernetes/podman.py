"""Real containers for the Kubernetes manifests: the image built from the working tree,
and the pods of a rendered workload (StatefulSet or Deployment) run by ``podman kube play``.

What podman (4.3, the Debian 12 package this machine has) lacks, and how the manifests are
translated for it (``pods_for_podman``); everything else is the rendered manifest as is:

* Workloads: kube play runs Pods of their own template, named as Kubernetes names them:
  ``zmesh-example-N`` for a StatefulSet's ordinal N (with a PersistentVolumeClaim
  ``data-zmesh-example-N`` for its ``volumeClaimTemplates`` entry), ``zmesh-example-<hash>-
  <suffix>`` (random) for a Deployment's (``deployment_pod_name``). podman's own Deployment
  support would name them itself; one Pod at a time lets a test kill and replace one.
* Native sidecar: podman runs init containers to completion before the others, so the
  zmesh init container with ``restartPolicy: Always`` becomes an ordinary container. The
  app may then start before the node listens; ``zmesh sub`` exits and is restarted.
* The Secret (the group signer) and the ConfigMap zmesh-authority: both are made by the
  user (``kubectl create``), not rendered; and podman 4.3 crashes on Secret volumes (a nil
  secrets manager). A host directory per pod stands in for each (``provide``), the Secret's
  files as the kubelet gives them with ``fsGroup`` (group 10001, mode 0440); per pod, so
  that a test can give one pod another authority's files.
* emptyDir: podman applies no ``fsGroup``, so uid 10001 could not write a root-owned
  emptyDir: host directories owned by 10001 stand in.
* Probes: podman 4.3 maps only liveness probes, onto systemd timers (absent here); the
  probes are dropped and the tests ask ``/healthz`` and ``/readyz`` themselves.
* ``resources``: this host cannot apply cgroup limits (see containers.sh); dropped.
* ``ports``: podman 4.3 publishes every ``containerPort`` on the host (three pods would
  clash on 7100); in Kubernetes they are informational. Dropped; pods reach each other on
  the podman network, and the tests reach them at their pod addresses.
* The headless Service: a podman network alias (``--network NET:alias=zmesh``) resolves to
  every pod, as the Service name does; ``--dns-name`` names it instead of
  ``zmesh.$(POD_NAMESPACE).svc.cluster.local``, and ``metadata.namespace`` (which podman
  cannot give through the downward API) becomes the literal ``default``.
* ``$(VAR)`` in args: podman 4.3 passes them on literally; they are expanded here from
  the container's env, as Kubernetes expands them.
* The image reference ``zmesh:latest`` becomes the image just built.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = os.environ.get("ZMESH_BASE_IMAGE", "localhost/zmesh-base:bookworm")
IMAGE = "localhost/zmesh:kube-test"
BUILD_STAGE = "localhost/zmesh:kube-test-build"
UID = 10001
BUILD_TIMEOUT = 600.0
COMMAND_TIMEOUT = 120.0


def run(*args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:4])}... exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def unavailable() -> str | None:
    """Why containers cannot run here (a skip reason), or None."""
    if shutil.which("podman") is None:
        return "podman not installed (../shared/testbed/containers.sh installs it; .ci/run calls it)"
    if os.geteuid() != 0:
        return "container tests need root (rootful podman networks with DNS)"
    try:
        info = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman info failed: {exc}"
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[:200]}"
    if subprocess.run(["podman", "image", "exists", BASE], timeout=60).returncode != 0:
        return f"base image {BASE} missing (run ../shared/testbed/containers.sh)"
    return None


def build_image() -> dict[str, float]:
    """Build the image from the working tree, as the Containerfile says for a machine whose
    builds cannot reach the package index: wheels on the host, then ``podman build``.
    Podman's layer cache and pip's wheel cache make a rebuild with no change take seconds."""
    wheels = REPO / ".build" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for stale in wheels.glob("zmesh_mqtt-*.whl"):
        stale.unlink()  # the image builds zmesh itself, from the context
    t0 = time.monotonic()
    run("python3", "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), "--no-deps",
        "setuptools", "wheel", timeout=BUILD_TIMEOUT)
    # Dependencies only (zmesh's own wheel is built in the image): from pyproject.
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    run("python3", "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), *deps, timeout=BUILD_TIMEOUT)
    t1 = time.monotonic()
    # The wheel stage is tagged too, so that a rebuild can free what the last one left:
    # each changed build would otherwise leave ~800 MB of untagged images behind.
    before = {tag: _image_id(tag) for tag in (IMAGE, BUILD_STAGE)}
    common = ["--format", "docker", "--build-arg", f"BASE={BASE}",
              "--build-arg", "PIP_WHEEL_ARGS=--no-index --find-links /src/.build/wheels"]
    run("podman", "build", *common, "--target", "build", "-t", BUILD_STAGE, str(REPO), timeout=BUILD_TIMEOUT)
    run("podman", "build", *common, "-t", IMAGE, str(REPO), timeout=BUILD_TIMEOUT)
    for tag, old in before.items():
        if old and old != _image_id(tag):
            run("podman", "rmi", old, check=False)  # in use (a container of it): kept
    t2 = time.monotonic()
    size = int(run("podman", "image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    return {"wheels_s": t1 - t0, "build_s": t2 - t1, "size_bytes": size}


def _image_id(tag: str) -> str | None:
    result = run("podman", "image", "inspect", tag, "--format", "{{.Id}}", check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _translate_container(container: dict[str, Any], pod: str) -> dict[str, Any]:
    c = copy.deepcopy(container)
    c["image"] = IMAGE
    c.pop("imagePullPolicy", None)
    c.pop("restartPolicy", None)  # a native sidecar's: an ordinary container here
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        c.pop(probe, None)
    c.pop("resources", None)
    c.pop("ports", None)  # podman publishes containerPorts on the host; Kubernetes does not
    values: dict[str, str] = {}
    for env in c.get("env", []):
        field = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field == "metadata.namespace":
            env.pop("valueFrom")
            env["value"] = "default"
        values[env["name"]] = {"metadata.name": pod, "metadata.namespace": "default"}.get(field or "", env.get("value", ""))
    args = ["--dns-name=zmesh" if a.startswith("--dns-name=zmesh.") else a for a in c.get("args", [])]
    for name, value in values.items():  # what Kubernetes does to $(VAR) in args
        args = [a.replace(f"$({name})", value) for a in args]
    if "args" in c:
        c["args"] = args
    return c


def deployment_pod_name(name: str) -> str:
    """A name as a Deployment's ReplicaSet makes one: nobody knows it in advance."""
    import secrets

    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' SafeEncodeString alphabet
    return f"{name}-{''.join(secrets.choice(alphabet) for _ in range(10))}-" \
           f"{''.join(secrets.choice(alphabet) for _ in range(5))}"


def _workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] in ("StatefulSet", "Deployment"))


def _stand_ins(docs: list[dict[str, Any]]) -> set[str]:
    """The volumes that a host directory stands in for: emptyDirs, Secrets, and ConfigMaps
    that the user creates (not among the rendered documents)."""
    rendered = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    return {v["name"] for v in _workload(docs)["spec"]["template"]["spec"]["volumes"]
            if "emptyDir" in v or "secret" in v or ("configMap" in v and v["configMap"]["name"] not in rendered)}


def pods_for_podman(docs: list[dict[str, Any]], pods: list[str], host_dirs: Path) -> str:
    """The rendered overlay's workload as kube play YAML for the pods named ``pods`` (see the
    module docstring for every change). ``host_dirs/POD/VOLUME`` must exist for each volume
    a host directory stands in for (``prepare_pod_dirs``, ``provide``). A claim whose volume
    exists (the pod was there before: a StatefulSet keeps its PVC) is used, not declared
    again, which kube play would refuse."""
    workload = _workload(docs)
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    template = workload["spec"]["template"]
    stand_ins = _stand_ins(docs)
    out: list[dict[str, Any]] = [config]
    for name in pods:
        spec = copy.deepcopy(template["spec"])
        inits = spec.pop("initContainers")
        assert [c.get("restartPolicy") for c in inits] == ["Always"], "only the native sidecar is an init container"
        spec["containers"] = [_translate_container(inits[0], name)] + [_translate_container(c, name) for c in spec["containers"]]
        volumes = []
        for volume in spec["volumes"]:
            if volume["name"] in stand_ins:
                volume = {"name": volume["name"],
                          "hostPath": {"path": str(host_dirs / name / volume["name"]), "type": "Directory"}}
            volumes.append(volume)
        for claim in workload["spec"].get("volumeClaimTemplates", []):
            claim_name = f"{claim['metadata']['name']}-{name}"
            if run("podman", "volume", "exists", claim_name, check=False).returncode != 0:
                out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": claim_name}, "spec": claim["spec"]})
            volumes.append({"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim_name}})
        spec["volumes"] = volumes
        spec.pop("automountServiceAccountToken", None)
        spec.pop("terminationGracePeriodSeconds", None)  # the tests stop containers with their own grace
        out.append({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": template["metadata"]["labels"],
                                 "annotations": template["metadata"].get("annotations", {})},
                    "spec": spec})
    return yaml.safe_dump_all(out, sort_keys=False)


def prepare_pod_dirs(docs: list[dict[str, Any]], pod: str, host_dirs: Path) -> None:
    """The emptyDirs' stand-ins: owned by the pod's user, as fsGroup would make them."""
    for volume in _workload(docs)["spec"]["template"]["spec"]["volumes"]:
        if "emptyDir" in volume:
            path = host_dirs / pod / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, UID, UID)
            path.chmod(0o700)


def provide(docs: list[dict[str, Any]], pod: str, host_dirs: Path, volume: str, files: dict[str, bytes]) -> None:
    """Pod ``pod``'s Secret or user-made ConfigMap volume ``volume`` holding ``files``, as
    the kubelet mounts it: root-owned, group fsGroup, the volume's defaultMode (ConfigMap:
    0644)."""
    spec = _workload(docs)["spec"]["template"]["spec"]
    source = next(v for v in spec["volumes"] if v["name"] == volume)
    assert volume in _stand_ins(docs), volume
    kind = "secret" if "secret" in source else "configMap"
    mode = int(source[kind].get("defaultMode", 0o644))
    group = int(spec["securityContext"].get("fsGroup", 0))
    path = host_dirs / pod / volume
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 0, group)
    path.chmod(0o750 if kind == "secret" else 0o755)
    for name, data in files.items():
        (path / name).write_bytes(data)
        os.chown(path / name, 0, group)
        (path / name).chmod(mode)


def pod_ip(pod: str, network: str) -> str:
    out = run("podman", "pod", "inspect", pod, "--format", "{{.InfraContainerID}}").stdout.strip()
    networks = json.loads(run("podman", "inspect", out, "--format", "{{json .NetworkSettings.Networks}}").stdout)
    return str(networks[network]["IPAddress"])

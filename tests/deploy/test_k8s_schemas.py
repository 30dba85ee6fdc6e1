"""Every rendered object is valid: built-in kinds against the Kubernetes JSON schemas
(kubernetes-validate, strict: unknown fields fail), custom resources against the CRDs
vendored in deploy/k8s/crds. Negative controls show each checker catches a typo."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from tests.deploy.manifests import CRDS, RENDERED, crd_schemas, one, render, validate_custom

# An older supported minor (preStop `sleep` is on by default from 1.30) and the newest bundled.
K8S_VERSIONS = ("1.31", "1.37")


@pytest.fixture(scope="module")
def schemas() -> dict:
    return crd_schemas()


@pytest.fixture(scope="module", autouse=True)
def parsed_once() -> Iterator[None]:
    """kubernetes-validate parses its schema files on every ``validate`` call, its 1.3-1.8 MiB ``_definitions.json`` too:
    ~1 CPU-s of this module's ~2 went to parsing the same files again. Here each file is parsed once per module;
    the validation is the library's own, on the same schemas (it does not change what it parsed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kubernetes_validate.utils, "schema_contents", functools.cache(kubernetes_validate.utils.schema_contents)
        )
        yield


def is_custom(obj: dict, schemas: dict) -> bool:
    return (obj["apiVersion"], obj["kind"]) in schemas


@pytest.mark.parametrize("overlay", list(RENDERED))
def test_every_object_is_schema_valid(rendered, schemas, overlay: str) -> None:
    objects = rendered[overlay]
    assert objects, f"{overlay} rendered nothing"
    for obj in objects:
        if is_custom(obj, schemas):
            validate_custom(obj, schemas)
            continue
        for version in K8S_VERSIONS:
            # Raises SchemaNotFoundError for a kind that is neither built in nor vendored.
            kubernetes_validate.validate(obj, version, strict=True)


def test_vendored_crds_are_exactly_the_custom_kinds_used(rendered, schemas) -> None:
    """Every kind Kubernetes does not know has a vendored CRD, and every vendored CRD is used."""
    custom = set()
    for objects in rendered.values():
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                custom.add((obj["apiVersion"], obj["kind"]))
    assert custom == set(schemas)


@pytest.mark.parametrize("path", sorted(CRDS.glob("*.yaml")), ids=lambda p: p.name)
def test_vendored_crds_are_valid_crds(path) -> None:
    kubernetes_validate.validate(yaml.safe_load(path.read_text()), K8S_VERSIONS[-1], strict=True)


def test_strict_builtin_validation_catches_a_typo(rendered) -> None:
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment", "loraserve"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(intervall="15s")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("InferencePool", lambda o: o["spec"]["targetPorts"].extend({"number": 8001 + i} for i in range(8))),
        ("InferencePool", lambda o: o["spec"].update(appProtocol="grpc")),
        ("InferencePool", lambda o: o["spec"].update(targetPortNumber=8000)),  # the pre-v1 field
        ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].update(failureMode="Open")),
    ],
)
def test_crd_validation_catches_mistakes(rendered, schemas, kind: str, mutate) -> None:
    obj = copy.deepcopy(one(rendered["gpu"], kind))
    validate_custom(obj, schemas)
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(obj, schemas)


def test_rendering_fails_loudly_on_a_broken_kustomization(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(RuntimeError, match="missing.yaml"):
        render(tmp_path)

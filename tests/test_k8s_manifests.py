"""Deployment manifests: valid YAML, and names, labels, claims, ports and paths that agree.

Covers deploy/k8s/*.yaml (with each other, and with the image built by docker/Dockerfile) and
docker/compose.yaml. No cluster and no Docker needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"


def _docs() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s by (kind, name); the kustomization excluded."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _one(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one object of ``kind`` of the service and its job (the Dask cluster's are apart)."""
    found = [doc for (k, name), doc in objects.items() if k == kind and not name.startswith("aqe-dask-")]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


def _dockerfile(instruction: str) -> str:
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith(instruction + " ")]
    assert len(lines) == 1, f"one {instruction} in the Dockerfile"
    return lines[0].split(None, 1)[1].strip()


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return _docs()


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    image_names = {i["name"] for i in kustomization.get("images", [])}
    for obj in _docs().values():
        if obj["kind"] in ("Deployment", "CronJob"):
            for c in _pod(obj)["spec"]["containers"]:
                assert c["image"].split(":")[0] in image_names


def test_deployment_selector_matches_pods_and_service(objects) -> None:
    deployment = _one(objects, "Deployment")
    service = _one(objects, "Service")
    pod_labels = _pod(deployment)["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["selector"] == selector
    # The CronJob's pods must not be picked up by the Service.
    cron_labels = _pod(_one(objects, "CronJob"))["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= cron_labels.items()


def test_ports_agree_with_the_image(objects) -> None:
    container = _pod(_one(objects, "Deployment"))["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == {int(_dockerfile("EXPOSE"))}
    assert int(_env(container)["AQE_PORT"]) in ports.values()
    for port in _one(objects, "Service")["spec"]["ports"]:
        target = port["targetPort"]
        assert target in ports or target in ports.values()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ports or get["port"] in ports.values()


def test_volume_claims_exist_and_index_is_read_only_for_search(objects) -> None:
    claims = {name for (kind, name) in objects if kind == "PersistentVolumeClaim"}
    for kind in ("Deployment", "CronJob"):
        pod = _pod(_one(objects, kind))["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (kind, v)
        for c in pod["containers"]:
            for m in c["volumeMounts"]:
                assert m["name"] in volumes, (kind, m)
    index_claim = {
        kind: {v["name"]: v for v in _pod(_one(objects, kind))["spec"]["volumes"]}["index"][
            "persistentVolumeClaim"
        ]["claimName"]
        for kind in ("Deployment", "CronJob")
    }
    assert index_claim["Deployment"] == index_claim["CronJob"]

    search = _pod(_one(objects, "Deployment"))["spec"]["containers"][0]
    nightly = _pod(_one(objects, "CronJob"))["spec"]["containers"][0]
    search_index = next(m for m in search["volumeMounts"] if m["name"] == "index")
    nightly_index = next(m for m in nightly["volumeMounts"] if m["name"] == "index")
    assert search_index["readOnly"] is True
    assert not nightly_index.get("readOnly", False)
    # The service reads the root the job publishes into.
    assert _env(search)["AQE_INDEX_ROOT"] == search_index["mountPath"]
    command = nightly["command"]
    assert command[:2] == ["index-builder", "nightly"]
    assert command[command.index("--root") + 1] == nightly_index["mountPath"]
    gallery = next(m for m in nightly["volumeMounts"] if m["name"] == "gallery")
    for flag in ("--gallery", "--ids", "--metadata"):
        if flag in command:
            assert command[command.index(flag) + 1].startswith(gallery["mountPath"] + "/")


def test_same_image_and_non_root_user_everywhere(objects) -> None:
    user, _, group = _dockerfile("USER").partition(":")
    images = set()
    for kind in ("Deployment", "CronJob"):
        pod = _pod(_one(objects, kind))["spec"]
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert (ctx["runAsUser"], ctx["runAsGroup"]) == (int(user), int(group or user))
        assert ctx["fsGroup"] == int(group or user)  # a fresh volume becomes writable for it
        images |= {c["image"] for c in pod["containers"]}
    assert len(images) == 1


def test_cronjob_never_overlaps(objects) -> None:
    cron = _one(objects, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert re.fullmatch(r"(\S+\s+){4}\S+", cron["spec"]["schedule"])
    assert _pod(cron)["spec"]["restartPolicy"] in ("Never", "OnFailure")


# ---------------------------------------------------------------- docker/compose.yaml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_and_volumes(compose) -> None:
    services = compose["services"]
    assert set(services) == {"search", "nightly", "build", "dask-scheduler", "dask-worker", "build-dask"}
    assert services["build"]["profiles"] == ["build"]
    assert "profiles" not in services["search"] and "profiles" not in services["nightly"]
    images = {s["image"] for s in services.values()}
    assert len(images) == 1
    volumes = set(compose["volumes"])
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source in volumes or source.startswith(("${", ".", "/")), (name, mount)
    assert "index:/data/index:ro" in services["search"]["volumes"]
    for name in ("nightly", "build", "dask-worker", "build-dask"):
        assert "index:/data/index" in services[name]["volumes"]
        assert services[name]["environment"]["AQE_INDEX_ROOT"] == "/data/index"
    assert services["search"]["environment"]["AQE_INDEX_ROOT"] == "/data/index"


def test_compose_publishes_on_loopback_only(compose) -> None:
    search = compose["services"]["search"]
    expose = int(_dockerfile("EXPOSE"))
    for port in search["ports"]:
        host, _, container = str(port).rpartition(":")
        assert host.startswith("127.0.0.1:"), port
        assert int(container) == expose == int(search["environment"]["AQE_PORT"])
    for name in ("nightly", "build"):
        assert "ports" not in compose["services"][name]


def test_start_up_may_take_as_long_as_loading_the_largest_version(objects) -> None:
    """The first load runs before the port answers: the startupProbe must hold liveness off."""
    container = _pod(_one(objects, "Deployment"))["spec"]["containers"][0]
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    # /healthz: a process with nothing (or only refused versions) to serve is alive, not broken
    assert startup["httpGet"]["path"] == "/healthz" == liveness["httpGet"]["path"]
    budget_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s >= 600  # 10 s/GB planned (copy + checksum): a 60 GB version
    assert "initialDelaySeconds" not in liveness  # the startupProbe replaces it


def test_the_local_copy_is_on_a_disk_volume_the_service_can_write(objects) -> None:
    pod = _pod(_one(objects, "Deployment"))["spec"]
    container = pod["containers"][0]
    local = Path(_env(container)["AQE_LOCAL_COPY_DIR"])
    mounts = [m for m in container["volumeMounts"] if local.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1 and local != Path(mounts[0]["mountPath"])  # a directory it creates (0700)
    assert not mounts[0].get("readOnly", False)
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[0]["name"]]
    # node disk, not a tmpfs: pages of a tmpfs copy would be memory, not reclaimable page cache
    assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory"


def test_compose_dask_profile(compose) -> None:
    """A scheduler, workers pointed at it, and a build pointed at it, all in the dask profile."""
    services = compose["services"]
    for name in ("dask-scheduler", "dask-worker", "build-dask"):
        assert services[name]["profiles"] == ["dask"]
    assert services["dask-scheduler"]["command"][:2] == ["dask", "scheduler"]
    worker = services["dask-worker"]["command"]
    assert worker[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert worker[worker.index("--nthreads") + 1] == "1"
    assert "--cluster tcp://dask-scheduler:8786" in services["build-dask"]["environment"]["NIGHTLY_ARGS"]
    for port in services["dask-scheduler"]["ports"]:
        assert str(port).startswith("127.0.0.1:"), port


def test_dask_cluster_manifests(objects) -> None:
    """Scheduler Deployment and Service agree; workers and the CronJob use them and the same claims."""
    scheduler = objects[("Deployment", "aqe-dask-scheduler")]
    service = objects[("Service", "aqe-dask-scheduler")]
    workers = objects[("StatefulSet", "aqe-dask-worker")]
    labels = _pod(scheduler)["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert scheduler["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert workers["spec"]["selector"]["matchLabels"].items() <= _pod(workers)["metadata"]["labels"].items()
    port = next(p for p in service["spec"]["ports"] if p["name"] == "scheduler")["port"]
    address = f"tcp://{service['metadata']['name']}:{port}"
    worker = _pod(workers)["spec"]["containers"][0]
    assert worker["command"][:3] == ["dask", "worker", address]
    limit = worker["command"][worker["command"].index("--memory-limit") + 1]
    assert limit.rstrip("iB") == worker["resources"]["limits"]["memory"].rstrip("i")
    nightly = _pod(_one(objects, "CronJob"))["spec"]["containers"][0]["command"]
    assert nightly[nightly.index("--cluster") + 1] == address
    cron_volumes = {v["name"]: v for v in _pod(_one(objects, "CronJob"))["spec"]["volumes"]}
    for v in _pod(workers)["spec"]["volumes"]:
        if "persistentVolumeClaim" in v:
            assert v == cron_volumes[v["name"]]
    images = {c["image"] for o in (scheduler, workers) for c in _pod(o)["spec"]["containers"]}
    assert images == {_pod(_one(objects, "CronJob"))["spec"]["containers"][0]["image"]}

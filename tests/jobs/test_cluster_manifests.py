"""Schema/field checks of the KubeRay, CronJob and job-config files; entrypoints are parsed by our own CLIs."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs import catalog, narrate

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
CRON = re.compile(r"^(\S+\s+){4}\S+$")


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and doc.get("metadata", {}).get("name"), path
    return doc


def _check_cluster(spec: dict, where: str) -> None:
    """A RayCluster spec: pinned Ray, a head that takes no work, GPU worker groups with sane bounds."""
    assert re.fullmatch(r"2\.\d+\.\d+", spec["rayVersion"]), where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: head must not run replicas/actors"
    for c in head["template"]["spec"]["containers"]:
        assert c["image"] and c["resources"]["limits"]["memory"], where
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']} bounds"
        (c,) = g["template"]["spec"]["containers"]
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert int(lim["nvidia.com/gpu"]) >= 1 and req["nvidia.com/gpu"] == lim["nvidia.com/gpu"], where
        tol = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tol), f"{where}: GPU taint not tolerated"


def _entrypoint(cmd: str, module: str, parser) -> object:
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", module], argv
    return parser().parse_args(argv[3:])  # SystemExit on an option our CLI does not have


def test_rayservice_serves_the_qtts_app_on_gpus():
    doc = _load(KUBERAY / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    assert app["name"] == "qtts" and app["route_prefix"] == "/"
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    from serve.config import ServiceConfig

    cfg = ServiceConfig.from_dict(app["args"])  # the service's own validation
    assert all(m.num_gpus >= 1 for m in cfg.models)
    _check_cluster(doc["spec"]["rayClusterConfig"], "rayservice")
    ports = {p["name"] for p in doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
             ["containers"][0]["ports"]}
    assert {"gcs-server", "dashboard", "serve"} <= ports


def test_rayjob_runs_narration_with_one_actor_per_gpu():
    doc = _load(KUBERAY / "rayjob-narrate.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    args = _entrypoint(spec["entrypoint"], "jobs.narrate", narrate.build_parser)
    assert args.output.startswith("s3://") and args.input.startswith("s3://")
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], dict)
    _check_cluster(spec["rayClusterSpec"], "rayjob")
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                   ["nvidia.com/gpu"]) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert args.num_gpus == 1 and args.actors <= gpus


def test_raycronjob_regenerates_the_catalog():
    doc = _load(KUBERAY / "raycronjob-catalog.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    assert CRON.match(doc["spec"]["schedule"])
    tmpl = doc["spec"]["jobTemplate"]
    args = _entrypoint(tmpl["entrypoint"], "jobs.catalog", catalog.build_parser)
    assert args.retire in catalog.RETIRE_MODES
    _check_cluster(tmpl["rayClusterSpec"], "raycronjob")


def test_kubernetes_cronjob_submits_to_the_service_cluster():
    doc = _load(ROOT / "cluster" / "cron" / "catalog-cronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    assert CRON.match(doc["spec"]["schedule"]) and doc["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    cmd = c["command"]
    assert cmd[:3] == ["ray", "job", "submit"] and "--" in cmd
    tail = cmd[cmd.index("--") + 1:]
    args = _entrypoint(shlex.join(tail), "jobs.catalog", catalog.build_parser)
    assert args.backend == "serve"


@pytest.mark.parametrize("name,parser", [("narrate.yaml", narrate.build_parser),
                                         ("catalog.yaml", catalog.build_parser)])
def test_job_configs_are_accepted(name, parser):
    first = "book" if name == "narrate.yaml" else "c.yaml"
    args = parser().parse_args([first, "--config", str(ROOT / "configs" / "jobs" / name), "--model", "m"])
    defaults, render, opts, limits = narrate.build_options(args, "audio")
    assert opts.actors >= 1 and render.max_chars >= 8


def test_manifest_check_catches_a_broken_file(tmp_path):
    doc = _load(KUBERAY / "rayjob-narrate.yaml")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"].pop("nvidia.com/gpu")
    with pytest.raises(KeyError):
        _check_cluster(doc["spec"]["rayClusterSpec"], "broken")
    with pytest.raises(SystemExit):
        _entrypoint("python -m jobs.narrate x --no-such-option", "jobs.narrate", narrate.build_parser)

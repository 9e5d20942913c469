"""Deployment files: KubeRay manifests against the real CRD schemas, their `veil` command lines
against Veil's own parser, and the image they name against deploy/Dockerfile.

No Kubernetes API server can run here, so the KubeRay v1.7.0 CRDs in ../shared/k8s (see its
README) are the offline check: each manifest is validated against its CRD's openAPIV3Schema with
jsonschema, *strictly*. The API server prunes unknown fields silently (a misspelt
`workerGroupSpec` would just vanish and the cluster come up without workers), and the CRDs do not
say `additionalProperties: false`, so the tests add it to every object schema that lists its
properties. Schema defaults are filled in first, as the API server does, or required fields that
have defaults would be reported missing.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helpers import makefile_nodeps

from veil.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CRD_DIR = REPO.parent / "shared" / "k8s" / "kuberay-v1.7.0-crds"
KUBERAY_GROUP = "ray.io"
WEIGHT_SUFFIXES = (".onnx", ".pt", ".pth", ".ckpt", ".h5", ".hdf5", ".dat", ".safetensors", ".bin")

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay CRDs not found at {CRD_DIR} (../shared/k8s next to the repository; see "
           "its README): the manifests cannot be validated offline without them")


# ------------------------------------------------------------------------------ CRD schemas


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@cache
def crd_openapi(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the served ray.io/v1 version of ``kind``'s CRD, as published."""
    path = CRD_DIR / f"{KUBERAY_GROUP}_{kind.lower()}s.yaml"
    assert path.is_file(), f"no KubeRay CRD for kind {kind!r} ({path.name} missing)"
    sums = dict(reversed(line.split()) for line in (CRD_DIR / "SHA256SUMS").read_text().splitlines())
    assert _sha256(path) == sums[f"{CRD_DIR.name}/{path.name}"], f"{path} differs from SHA256SUMS"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["group"] == KUBERAY_GROUP and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return served["schema"]["openAPIV3Schema"]


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The strict schema of ``kind``: see :func:`strict`."""
    return strict(crd_openapi(kind))


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` in which every object that lists its properties rejects others.

    Objects that declare ``additionalProperties`` (maps such as labels or rayStartParams) or
    ``x-kubernetes-preserve-unknown-fields`` keep accepting any key, as the API server does."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for sub in node.get("properties", {}).values():
            visit(sub)
        for key in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not"):
            visit(node.get(key))

    visit(schema)
    return schema


def fill_defaults(instance: Any, schema: dict[str, Any]) -> Any:
    """``instance`` with schema defaults filled in where the enclosing object exists (the API
    server's defaulting), so required-with-default fields such as ``minReplicas`` pass."""
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
        for name, value in instance.items():
            if name in props:
                fill_defaults(value, props[name])
            elif isinstance(schema.get("additionalProperties"), dict):
                fill_defaults(value, schema["additionalProperties"])
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"])
    return instance


def _list_type(validator, list_type, instance, schema):
    """Kubernetes list semantics jsonschema does not know: ``set`` items and ``map`` keys
    (e.g. env names, container names) must be unique."""
    if not isinstance(instance, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys") if list_type == "map" else None
    seen: set[str] = set()
    for item in instance:
        ident = repr([item.get(k) for k in keys]) if keys and isinstance(item, dict) else repr(item)
        if list_type in ("map", "set") and ident in seen:
            yield jsonschema.ValidationError(f"duplicate entry {ident} in a list of type {list_type}")
        seen.add(ident)


# OpenAPI v3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum, no const).
K8sValidator = jsonschema.validators.extend(jsonschema.Draft4Validator,
                                            {"x-kubernetes-list-type": _list_type})


def schema_errors(doc: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Every schema violation of a KubeRay manifest, as 'path: message' lines."""
    schema = schema or crd_schema(doc["kind"])
    doc = fill_defaults(copy.deepcopy(doc), schema)
    errors = sorted(K8sValidator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return ["/" + "/".join(map(str, e.absolute_path)) + f": {e.message}" for e in errors]


# ------------------------------------------------------------------------------ manifests


def enable_optional(text: str) -> str:
    """The manifest with its optional `#+` lines uncommented (they must stay valid too)."""
    return re.sub(r"^(\s*)#\+ ?", r"\1", text, flags=re.MULTILINE)


def manifest_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def kuberay_docs(text: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    return [d for d in docs if str(d.get("apiVersion", "")).split("/")[0] == KUBERAY_GROUP]


def all_kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in manifest_files() for d in kuberay_docs(p.read_text())]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    if doc["kind"] == "RayService":
        return doc["spec"]["rayClusterConfig"]
    return doc["spec"]


def groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head group and every worker group of a manifest."""
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def pod_containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every container and init container of every pod template in a manifest."""
    found = []

    def visit(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                if isinstance(node.get(key), list):
                    found.extend((f"{where}/{key}/{c.get('name')}", c) for c in node[key])
            for key, value in node.items():
                visit(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, f"{where}/{i}")

    visit(doc.get("spec"), doc["kind"])
    return found


def test_deploy_has_the_manifests():
    names = {p.name for p in manifest_files()}
    assert {"rayjob.yaml", "raycluster.yaml"} <= names
    kinds = {d["kind"] for _, d in all_kuberay_docs()}
    assert {"RayJob", "RayCluster"} <= kinds


@needs_crds
@pytest.mark.parametrize("optional", [False, True], ids=["as-shipped", "optional-enabled"])
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_matches_kuberay_crd_strictly(path: Path, optional: bool):
    text = path.read_text()
    if optional:
        if "#+" not in text:
            pytest.skip(f"{path.name} has no optional `#+` lines")
        text = enable_optional(text)
    docs = kuberay_docs(text)
    for doc in docs:
        assert doc["apiVersion"] == f"{KUBERAY_GROUP}/v1", f"{path.name}: use the v1 API"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} needs metadata.name"
        errors = schema_errors(doc)
        assert not errors, f"{path.name} ({doc['kind']}) breaks the KubeRay v1.7.0 CRD:\n" + "\n".join(errors)


@pytest.fixture()
def rayjob() -> dict[str, Any]:
    (doc,) = [d for name, d in all_kuberay_docs() if name == "rayjob.yaml"]
    return copy.deepcopy(doc)


@needs_crds
def test_strict_validation_rejects_a_misspelt_field(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    spec["workerGroupSpec"] = spec.pop("workerGroupSpecs")
    errors = schema_errors(rayjob)
    assert any("workerGroupSpec" in e and "rayClusterSpec" in e for e in errors), errors
    # The CRD as published accepts it (the API server would drop the workers silently), which is
    # why the tests make the schema strict.
    assert not schema_errors(rayjob, crd_openapi("RayJob"))


@needs_crds
def test_strict_validation_rejects_unknown_fields_inside_the_pod_template(rayjob):
    container = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    errors = schema_errors(rayjob)
    assert any("'resource'" in e and "/containers/0" in e for e in errors), errors


@needs_crds
def test_strict_validation_rejects_wrong_types(rayjob):
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "4"
    assert any("workerGroupSpecs/0/replicas" in e and "is not of type 'integer'" in e
               for e in schema_errors(bad)), schema_errors(bad)
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("rayStartParams/num-cpus" in e and "is not of type 'string'" in e
               for e in schema_errors(bad)), schema_errors(bad)


@needs_crds
def test_strict_validation_rejects_duplicate_list_map_keys(rayjob):
    container = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["ports"].append(dict(container["ports"][0]))
    assert any("duplicate entry" in e and "/ports" in e for e in schema_errors(rayjob))


@needs_crds
def test_schema_defaults_are_filled_before_validation(rayjob):
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]  # required, but defaulted (0, 2^31-1)
    assert not schema_errors(rayjob)
    assert any("'minReplicas' is a required property" in e.message
               for e in K8sValidator(crd_schema("RayJob")).iter_errors(rayjob)), "defaults matter"


# ------------------------------------------------------------------------------ cluster shape


@pytest.mark.parametrize("name,doc", all_kuberay_docs(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_cluster_shape(name: str, doc: dict[str, Any]):
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: no work on the head"
    workers = spec["workerGroupSpecs"]
    gpu_groups = [g for g in workers if "nvidia.com/gpu" in _ray_container(g)["resources"]["limits"]]
    assert gpu_groups and len(gpu_groups) < len(workers), f"{name}: needs a CPU and a GPU group"
    for group in workers:
        limit = _ray_container(group)["resources"]["limits"].get("nvidia.com/gpu")
        gpus = group["rayStartParams"].get("num-gpus")
        assert (limit is None) == (gpus is None), f"{name}/{group['groupName']}: num-gpus vs GPU limit"
        if limit is not None:
            assert float(gpus) == float(limit), f"{name}/{group['groupName']}: num-gpus != GPU limit"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    # The image's Ray is the Ray that KubeRay is told about (it picks probes and commands by it).
    pin = re.search(r'"ray\[[^\]]*\]==([\w.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert spec["rayVersion"] == pin == installed_version("ray")


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the first one runs Ray


@pytest.mark.parametrize("name,doc", all_kuberay_docs(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_container_has_requests_equal_to_limits(name: str, doc: dict[str, Any]):
    containers = pod_containers(doc)
    autoscaler = cluster_spec(doc).get("autoscalerOptions")
    if autoscaler:
        containers.append(("autoscaler", autoscaler))
    assert containers
    for where, container in containers:
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("limits", {})), f"{name}: {where}: set limits"
        assert resources.get("requests") == resources["limits"], f"{name}: {where}: requests != limits"


@pytest.mark.parametrize("name,doc", all_kuberay_docs(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_models_mounted_and_credentials_from_secrets(name: str, doc: dict[str, Any]):
    for group_name, group in groups(doc):
        pod = group["template"]["spec"]
        container = _ray_container(group)
        env = {e["name"]: e for e in container.get("env", [])}
        # No `veil models fetch` exists, so model files come from a read-only PVC on every pod.
        assert env["VEIL_MODELS"].get("value") == "/models", f"{name}/{group_name}"
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount.get("readOnly") is True, f"{name}/{group_name}: mount /models read-only"
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"], f"{name}/{group_name}"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[key].get("valueFrom", {}), f"{name}/{group_name}: {key}"
        for var in env.values():
            if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", var["name"]):
                assert "value" not in var, f"{name}/{group_name}: {var['name']} must come from a Secret"


# ------------------------------------------------------------------------------ veil commands


def shell_words(shell: str, command_text: str) -> list[str]:
    """The argv a real ``shell`` makes of ``command_text`` (quotes, braces, variables)."""
    exe = shutil.which(shell)
    assert exe, f"{shell} is needed to check how the manifests' commands are parsed"
    out = subprocess.run([exe, "-c", "printf '%s\\0' " + command_text], capture_output=True,
                         check=True, timeout=10, env={"PATH": "/usr/bin:/bin"}).stdout
    return out.decode().split("\0")[:-1]


def entrypoint_argv(entrypoint: str, head_shell: str = "sh") -> list[str]:
    """What the head runs for a RayJob entrypoint: KubeRay's submitter pasts it into a
    `/bin/bash -ce` script (`ray job submit ... -- ENTRYPOINT`), `ray job submit` rejoins its
    arguments with subprocess.list2cmdline, and the job supervisor runs that string with
    shell=True (/bin/sh, dash on the Debian-based image)."""
    submit_args = shell_words("bash", entrypoint.strip())
    return shell_words(head_shell, subprocess.list2cmdline(submit_args))


def parse_veil(argv: list[str], where: str):
    assert argv and argv[0] == "veil", f"{where}: not a veil command: {argv}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `veil` rejects {shlex.join(argv)}:\n{err.getvalue()}")


def container_commands(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """`veil` command lines of containers and init containers (exec form or `sh -c` scripts)."""
    found = []
    for where, container in pod_containers(doc):
        argv = list(container.get("command", [])) + list(container.get("args", []))
        if argv[:1] == ["veil"]:
            found.append((where, argv))
        elif len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1].startswith("-"):
            script = " ".join(argv[2:])
            for line in re.split(r"&&|\|\||;|\n", script):
                if line.strip().startswith("veil "):
                    found.append((where, shell_words(Path(argv[0]).name, line)))
    return found


def test_rayjob_entrypoint_is_a_real_veil_run():
    jobs = [(name, d) for name, d in all_kuberay_docs() if d["kind"] == "RayJob"]
    assert jobs
    for name, job in jobs:
        for head_shell in ("sh", "bash"):  # dash today; bash if the base image ever changes
            args = parse_veil(entrypoint_argv(job["spec"]["entrypoint"], head_shell),
                              f"{name} entrypoint")
            assert args.command == "run"
            # The shard range reaches Veil unexpanded, for Veil's own brace expansion.
            assert "{" in args.input and args.input.startswith("s3://"), args.input
            assert args.output.startswith("s3://"), args.output
            assert args.ray_address == "auto" and args.runner in (None, "ray")
            assert args.gates is not None, "RELEASE.json only when the gates pass: use --gates"
            if args.gpus_per_worker:
                per_node = [float(g["rayStartParams"].get("num-gpus", 0)) for _, g in groups(job)]
                assert max(per_node) >= args.gpus_per_worker, "no worker group has enough GPUs"


def test_entrypoint_check_catches_shell_expansion():
    # Quoted once, the range survives the submitter's bash but the head's shell expands it if
    # that is bash: Veil would get 3 inputs (argparse error). Unquoted, bash expands it at once.
    once = "veil run --input 's3://b/shard-{0..2}.tar' --output s3://b/out/ --ray-address auto"
    assert parse_veil(entrypoint_argv(once, "sh"), "once").input == "s3://b/shard-{0..2}.tar"
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments"):
        parse_veil(entrypoint_argv(once, "bash"), "once")
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments"):
        parse_veil(entrypoint_argv(once.replace("'", ""), "sh"), "unquoted")
    with pytest.raises(pytest.fail.Exception, match="rejects"):
        parse_veil(["veil", "run", "--method", "fsap", "--gpu-per-worker", "1"], "typo")


def test_container_veil_commands_parse():
    for name, doc in all_kuberay_docs():
        for where, argv in container_commands(doc):
            parse_veil(argv, f"{name}: {where}")


def test_container_command_extraction_finds_init_containers():
    pod = {"kind": "RayCluster", "spec": {"template": {"spec": {
        "initContainers": [{"name": "check", "command": ["sh", "-c", "veil models --json && echo ok"]}],
        "containers": [{"name": "c", "command": ["veil"], "args": ["run", "--bogus"]}]}}}}
    found = dict(container_commands(pod))
    assert found == {"RayCluster/template/spec/containers/c": ["veil", "run", "--bogus"],
                     "RayCluster/template/spec/initContainers/check": ["veil", "models", "--json"]}
    parse_veil(found["RayCluster/template/spec/initContainers/check"], "init")
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --bogus"):
        parse_veil(found["RayCluster/template/spec/containers/c"], "container")


def documented_commands(lines: list[str]) -> list[str]:
    """`veil ...` command lines shown in documentation (with `\\` continuations)."""
    commands, current = [], None
    for line in (line.strip() for line in lines):
        if current is not None:
            current += " " + line.rstrip("\\")
        elif line.startswith("veil "):
            current = line.rstrip("\\")
        if current is not None and not line.endswith("\\"):
            commands.append(current)
            current = None
    return commands


def check_documented_command(command: str, where: str) -> None:
    argv = shell_words("bash", command)  # typed into the user's shell
    parse_veil(argv, where)
    if argv[1] == "submit":
        # `veil submit ... -- VEIL ARGS` runs VEIL ARGS on the cluster.
        assert "--" in argv, command
        parse_veil(["veil"] + argv[argv.index("--") + 1:], where)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_commands_in_manifest_comments_parse(path: Path):
    comments = [re.sub(r"^\s*#", "", line) for line in path.read_text().splitlines()
                if line.lstrip().startswith("#")]
    for command in documented_commands(comments):
        check_documented_command(command, f"{path.name} comment")


def test_commands_in_deploy_readme_parse():
    commands = documented_commands((DEPLOY / "README.md").read_text().splitlines())
    assert any(" submit " in c for c in commands) and any(c.startswith("veil ") for c in commands)
    for command in commands:
        check_documented_command(command, "deploy/README.md")


# ------------------------------------------------------------------------------ image


def dockerfile_stages() -> list[dict[str, Any]]:
    """Stages of deploy/Dockerfile: name, base and instructions (continuations joined)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        op, _, rest = line.strip().partition(" ")
        if op.upper() == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            stages.append({"base": m.group(1), "name": m.group(2), "lines": []})
        elif stages:
            stages[-1]["lines"].append((op.upper(), rest.strip()))
    return stages


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_manifests_use_the_image_the_dockerfile_builds():
    tag = f"veil:{project_version()}"
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"docker build -f deploy/Dockerfile -t {tag} ." in text, "document the tag built"
    final = dockerfile_stages()[-1]  # the default target
    assert ("ENTRYPOINT", '["veil"]') in final["lines"]
    images = []
    for name, doc in all_kuberay_docs():
        images += [(f"{name}: {where}", c.get("image")) for where, c in pod_containers(doc)]
        autoscaler = cluster_spec(doc).get("autoscalerOptions") or {}
        if "image" in autoscaler:
            images.append((f"{name} autoscaler", autoscaler["image"]))
    assert images
    for where, image in images:
        assert image == tag or (image or "").endswith("/" + tag), f"{where}: image {image!r} != {tag}"


def test_dockerfile_installs_veil_as_the_makefile_does():
    stages = {s["name"]: s for s in dockerfile_stages()}
    runtime = stages["runtime"]
    assert runtime["base"] in ("${PYTHON_IMAGE}", "python:3.11-slim")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (DEPLOY / "Dockerfile").read_text()
    runs = " ".join(rest for op, rest in runtime["lines"] if op == "RUN")
    assert re.search(r"pip install [^&]*/tmp/veil-src", runs), "install the veil package"
    assert ("COPY", ". /tmp/veil-src") in runtime["lines"]
    makefile = (REPO / "Makefile").read_text()
    # The Dockerfile reads NODEPS out of the Makefile: run its sed program on the Makefile.
    sed_program = re.search(r"sed -n '([^']+)' /tmp/veil-src/Makefile", runs).group(1)
    out = subprocess.run(["sed", "-n", sed_program, str(REPO / "Makefile")], capture_output=True,
                         text=True, check=True, timeout=10).stdout.split()
    nodeps = makefile_nodeps()
    assert out == nodeps and all("==" in p for p in nodeps), out
    # Every install pinned to the tested environment, as `make install` does.
    installs = re.findall(r"pip install [^&]*", runs)
    assert len(installs) == 3, installs
    assert all("-c /tmp/veil-src/constraints.txt" in cmd for cmd in installs), installs
    check = re.search(r'python -c "(import veil\.cli[^"]*)"', makefile).group(1)
    assert f'python -c "{check}"' in runs, "run the Makefile's import check"
    assert "ray.dashboard.optional_deps" in runs, "ray[default]: the Jobs API needs the dashboard"
    envs = " ".join(rest for op, rest in runtime["lines"] if op == "ENV")
    assert re.search(r"\bVEIL_MODELS=/models\b", envs)
    (user,) = [rest for op, rest in runtime["lines"] if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can check it)"
    # Python and Beam as pinned in pyproject.toml.
    pyproject = (REPO / "pyproject.toml").read_text()
    beam = re.search(r'"apache-beam==([\w.]+)"', pyproject).group(1)
    assert f"ARG BEAM_SDK_IMAGE=apache/beam_python3.11_sdk:{beam}" in (DEPLOY / "Dockerfile").read_text()
    assert 'requires-python = ">=3.11"' in pyproject


def dockerignore_includes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            included = negate
    return included


def context_files(patterns: list[str]) -> list[str]:
    """Files of the repository that could reach the build context: directories that are
    excluded and that no `!` pattern reaches into are not walked (.venv, outputs)."""
    reopen = [p[1:].strip("/") for p in patterns if p.startswith("!")]
    files = []
    for root, dirs, names in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        prefix = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if dockerignore_includes(patterns, prefix + d)
                   or any("**" in p or p.startswith(prefix + d + "/") for p in reopen)]
        files += [prefix + n for n in names]
    return files


def test_docker_context_sends_sources_but_no_weights_or_data():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    # No COPY/ADD other than the (filtered) context, and no weights named anywhere.
    for stage in dockerfile_stages():
        for op, rest in stage["lines"]:
            if op in ("COPY", "ADD"):
                assert rest in (". /tmp/veil-src", "--from=beam-boot /opt/apache/beam /opt/apache/beam"), rest
    for must in ("pyproject.toml", "README.md", "Makefile", "constraints.txt", "cli.py", "pipelines/runners.py",
                 "validators/gates.yaml", "transforms/detect.py"):
        assert dockerignore_includes(patterns, must), f"{must} must reach the image"
    for never in (".venv/bin/python", ".git/config", "tests/test_deploy.py",
                  "tests/data/x.jpg", "bench-out/a.tar", "transforms/x.onnx",
                  "pipelines/__pycache__/a.pyc", "models/taef2_encoder.pth"):
        assert not dockerignore_includes(patterns, never), f"{never} must not reach the image"
    sent = [rel for rel in context_files(patterns) if dockerignore_includes(patterns, rel)]
    assert not [p for p in sent if p.endswith(WEIGHT_SUFFIXES) or p.startswith("tests/")], sent
    assert "pyproject.toml" in sent


@pytest.mark.slow
def test_docker_context_builds_a_complete_package(tmp_path: Path):
    """`pip install /tmp/veil-src` in the image sees only the filtered context: build a wheel
    from exactly those files and check that every module of the package, and every `veil.*`
    module the code imports, is in it."""
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    context = tmp_path / "context"
    for rel in context_files(patterns):
        if dockerignore_includes(patterns, rel):
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, context / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(context)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("veil-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("veil-")}
    expected = {f"veil/{p.name}" for p in REPO.glob("*.py")}
    expected |= {f"veil/{p.relative_to(REPO).as_posix()}" for p in REPO.glob("*/*.py")
                 if (p.parent / "__init__.py").is_file() and p.parent.name != "tests"}
    expected.add("veil/validators/gates.yaml")
    assert expected <= shipped, sorted(expected - shipped)
    modules = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in shipped if n.endswith(".py")}
    imported = set()
    with zipfile.ZipFile(wheel) as zf:
        for name in shipped:
            if name.endswith(".py"):
                imported |= set(re.findall(r"^\s*(?:from|import)\s+(veil(?:\.\w+)+)",
                                           zf.read(name).decode(), re.MULTILINE))
    # `from veil.x import y` may name a module or an attribute of veil.x: one of the two ships.
    missing = {m for m in imported if m not in modules and m.rpartition(".")[0] not in modules}
    assert not missing, f"imported but not in the image: {sorted(missing)}"

"""infra/ as a specification: the image, the KubeRay manifests, the cluster launcher config and the
runbook agree with each other and with the code they run.

Nothing here builds an image or talks to a cluster (no Docker engine, API server or cloud on the
machines that run the suite); every check reads the files and the project's own code: gitcap's
argument parser, `CaptionJob`, pyproject's dependency ranges and Ray's cluster-config schema.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from jobs import cli
from pipeline.job import CaptionJob

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

# Subcommands that another change is adding to jobs/cli.py right now: a command that names one of
# them cannot be parsed until it lands, and is an expected failure until then (not a pass).
PENDING_SUBCOMMANDS = {"run", "status"}

GPU = "nvidia.com/gpu"
# GPUs and vCPUs of the EC2 types the launcher may name (one GPU each: one captioning actor per node).
EC2_GPU_TYPES = {
    "g5.2xlarge": (1, 8), "g5.4xlarge": (1, 16), "g5.8xlarge": (1, 32),
    "g6.2xlarge": (1, 8), "g6.4xlarge": (1, 16), "g6.8xlarge": (1, 32),
    "g6e.2xlarge": (1, 8), "g6e.4xlarge": (1, 16),
}


# --- reading the files -----------------------------------------------------------------------


def load_documents(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def manifest(kind: str) -> dict:
    """The one document of `kind` among infra/kuberay's manifests."""
    found = [
        doc
        for path in sorted((INFRA / "kuberay").glob("*.yaml"))
        for doc in load_documents(path)
        if isinstance(doc, dict) and doc.get("kind") == kind
    ]
    assert len(found) == 1, f"expected one {kind} in infra/kuberay, found {len(found)}"
    return found[0]


def ray_cluster_specs() -> dict[str, dict]:
    return {
        "RayJob": manifest("RayJob")["spec"]["rayClusterSpec"],
        "RayCluster": manifest("RayCluster")["spec"],
    }


def launcher_config() -> dict:
    (config,) = load_documents(INFRA / "cluster" / "aws-gpu.yaml")
    return config


def caption_job() -> CaptionJob:
    configmap = manifest("ConfigMap")
    return CaptionJob.from_dict(yaml.safe_load(configmap["data"]["job.yaml"]))


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay's rule: the Ray container comes first


def resources(template: dict, kind: str) -> dict:
    return ray_container(template).get("resources", {}).get(kind, {})


def quantity(value) -> float:
    """A Kubernetes quantity as a number: `500m` -> 0.5, `56Gi` -> 56 * 2**30, `4` -> 4."""
    text = str(value)
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    decimal = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, scale in binary.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    if text[-1:] in decimal:
        return float(text[:-1]) * decimal[text[-1]]
    return float(text)


def gpus(template: dict) -> int:
    return int(resources(template, "limits").get(GPU, 0))


def all_images(node) -> list[str]:
    """Every container image anywhere in a manifest (head, workers, submitter, ...)."""
    if isinstance(node, dict):
        images = [c["image"] for c in node.get("containers", [])]
        return images + [i for key, v in node.items() if key != "containers" for i in all_images(v)]
    if isinstance(node, list):
        return [i for v in node for i in all_images(v)]
    return []


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line of infra/Dockerfile."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile():
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    return args


def dockerfile_base_image() -> str:
    (base,) = [rest for instruction, rest in dockerfile() if instruction == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: dockerfile_args()[m.group(1)], base)


def dependency_ranges() -> dict[str, Requirement]:
    return {Requirement(d).name.lower(): Requirement(d) for d in PYPROJECT["project"]["dependencies"]}


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.strip().lower()] = version.strip()
    return pins


def readme() -> str:
    return (INFRA / "README.md").read_text()


def parse_gitcap(argv: list[str]):
    """Parse `gitcap ARGV` with the real parser; an expected failure while its subcommand is pending."""
    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    known = set(subparsers.choices)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in known:
        assert command in PENDING_SUBCOMMANDS, f"`gitcap {command}` is not a gitcap subcommand ({sorted(known)})"
        pytest.xfail(f"`gitcap {command}` is not in jobs/cli.py yet (being added by another change)")
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:
        if stop.code == 0:  # --help
            return None
        pytest.fail(f"gitcap's parser rejects `gitcap {shlex.join(argv)}`")


def gitcap_commands_in_readme() -> list[tuple[str, list[str]]]:
    """(where, argv after `gitcap`) of every gitcap command in the README's code: "block" for
    fenced code blocks (commands to run), "inline" for `spans` in the prose (usage, placeholders)."""
    text = readme()
    snippets = [("block", line) for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    snippets += [("inline", span) for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
    commands = []
    for where, snippet in snippets:
        try:
            tokens = shlex.split(snippet, comments=True)
        except ValueError:
            tokens = snippet.split()
        for i, token in enumerate(tokens):
            if token.startswith("gitcap "):  # quoted, as in `ray exec CONFIG 'gitcap status ...'`
                commands.append((where, shlex.split(token)[1:]))
            elif token == "gitcap" and (i == 0 or tokens[i - 1] in {"--", ";", "&&", "||"}):  # in command position
                argv = []
                for arg in tokens[i + 1 :]:
                    if arg in {";", "&&", "||", "|", "&"} or arg[:1] in {">", "<"}:
                        break
                    argv.append(arg)
                commands.append((where, argv))
    return commands


# --- every file ------------------------------------------------------------------------------


def test_every_yaml_file_in_infra_parses_into_mappings():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    names = {f.relative_to(INFRA).as_posix() for f in files}
    assert names >= {
        "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/job-configmap.yaml", "cluster/aws-gpu.yaml",
    }
    for path in files:
        documents = [d for d in load_documents(path) if d is not None]
        assert documents, f"{path} is empty"
        assert all(isinstance(d, dict) for d in documents), f"{path}: every document must be a mapping"


def test_every_manifest_and_the_launcher_run_the_one_image_the_readme_builds_and_pushes():
    images = {
        "RayJob": all_images(manifest("RayJob")),
        "RayCluster": all_images(manifest("RayCluster")),
        "cluster launcher": [launcher_config()["docker"]["image"]],
    }
    assert len(images["RayJob"]) == 3, "the RayJob names its image for head, GPU workers and submitter"
    distinct = {i for found in images.values() for i in found}
    assert len(distinct) == 1, f"more than one image: {images}"
    (image,) = distinct
    repository, _, tag = image.rpartition(":")
    assert repository and tag == VERSION, f"{image}: the tag must be gitcap's version {VERSION}"

    built = re.findall(r"docker build [^\n]*-t (\S+)", readme())
    pushed = re.findall(r"docker push (\S+)", readme())
    assert built and pushed, "the README says how to build and push the image"
    assert set(built) == set(pushed) == {image}
    example = re.findall(r"docker build [^\n]*-t (\S+)", (INFRA / "Dockerfile").read_text())
    assert set(example) <= {image}


# --- KubeRay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_head_is_cpu_only_and_offers_no_cpus_or_gpus_to_ray(kind):
    head = ray_cluster_specs()[kind]["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0", "KubeRay wants string values; \"0\" keeps every task off the head"
    assert params["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        for kind_ in ("requests", "limits"):
            assert GPU not in container.get("resources", {}).get(kind_, {})
    assert not any(t.get("key") == GPU for t in head["template"]["spec"].get("tolerations", []))


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_gpu_worker_groups_request_what_they_limit_and_tolerate_the_gpu_taint(kind):
    groups = ray_cluster_specs()[kind]["workerGroupSpecs"]
    assert groups
    for group in groups:
        template = group["template"]
        requests, limits = resources(template, "requests"), resources(template, "limits")
        assert gpus(template) >= 1, f"{group['groupName']}: no {GPU} limit"
        # Ray sizes a worker from its limits; equal requests make Kubernetes reserve exactly that.
        for name in (GPU, "cpu", "memory"):
            assert quantity(requests[name]) == quantity(limits[name]), f"{group['groupName']}: {name}"
        assert "num-gpus" not in group["rayStartParams"] or int(group["rayStartParams"]["num-gpus"]) == gpus(template)
        tolerations = template["spec"].get("tolerations", [])
        assert any(
            t.get("key") == GPU and t.get("operator") == "Exists" and t.get("effect") == "NoSchedule"
            for t in tolerations
        ), f"{group['groupName']} must tolerate the {GPU}:NoSchedule taint of GPU nodes"


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_gpu_worker_group_autoscales_and_fits_the_job_specs_actor_pool(kind):
    spec = ray_cluster_specs()[kind]
    compute = caption_job().compute
    assert spec["enableInTreeAutoscaling"] is True
    groups = [g for g in spec["workerGroupSpecs"] if gpus(g["template"]) > 0]
    assert compute.gpus_per_worker > 0, "the example job captions on GPUs"
    capacity = sum(g["maxReplicas"] * gpus(g["template"]) for g in groups)
    assert compute.workers * compute.gpus_per_worker <= capacity, "the actor pool cannot all be placed"
    for group in groups:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], "an autoscaling group needs room to scale"
        pod_cpus = quantity(resources(group["template"], "limits")["cpu"])
        assert compute.gpus_per_worker <= gpus(group["template"]), "one actor must fit one pod"
        assert compute.cpus_per_worker < pod_cpus, "an actor must fit a pod and leave CPUs for decoding"


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_clusters_run_the_ray_version_of_the_image_with_token_authentication(kind):
    spec = ray_cluster_specs()[kind]
    assert spec["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    assert spec["authOptions"]["mode"] == "token"


def test_rayjob_reruns_a_failed_driver_and_removes_its_cluster_when_done():
    spec = manifest("RayJob")["spec"]
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", "submitterConfig applies to K8sJobMode"
    assert spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["backoffLimit"] >= 1, "a FAILED driver is rerun (on a new cluster) only by spec.backoffLimit"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    # Entrypoint resources would move the driver off the head, away from the mounted spec.
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)


def test_rayjob_entrypoint_runs_gitcap_on_the_spec_mounted_from_the_configmap():
    spec = manifest("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "gitcap" and argv[1] == "run", spec["entrypoint"]
    spec_path = PurePosixPath(next(a for a in argv[2:] if not a.startswith("-")))

    configmap = manifest("ConfigMap")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = [m for m in ray_container({"spec": head})["volumeMounts"] if PurePosixPath(m["mountPath"]) == spec_path.parent]
    assert mounts, f"nothing is mounted at {spec_path.parent} on the head"
    assert volumes[mounts[0]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert spec_path.name in configmap["data"]

    args = parse_gitcap(argv[1:])
    assert args.command == "run"
    assert args.address == "auto", "the driver must join the cluster it was submitted to, not start its own Ray"


def test_configmap_job_spec_is_a_valid_caption_job_on_storage_every_node_reaches():
    job = caption_job()
    for name, path in (("input.path", job.input.path), ("output.path", job.output.path)):
        assert isinstance(path, str) and "://" in path and not path.startswith("file://"), (
            f"{name}: {path!r} is local to one node; a cluster needs object storage"
        )
    assert job.model.path and ("://" in job.model.path or job.model.path.startswith("/"))


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_pins_ray_and_torch_inside_pyprojects_ranges():
    args, ranges = dockerfile_args(), dependency_ranges()
    for name, arg in (("ray", "RAY_VERSION"), ("torch", "TORCH_VERSION")):
        assert Version(args[arg]) in ranges[name].specifier, f"{arg}={args[arg]} is outside pyproject's {ranges[name]}"
        assert constraint_pins()[name] == args[arg], f"constraints.txt and the Dockerfile disagree on {name}"

    base = dockerfile_base_image()
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-(?P<cuda>cu\d+)", base)
    assert match, f"unexpected base image {base}"
    assert match["ray"] == args["RAY_VERSION"]
    python = f"{match['py']}.{match['minor']}"
    assert Version(python) in Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/" + match["cuda"]), "torch's CUDA build must match the base's"


def test_constraints_pin_every_dependency_inside_pyprojects_range():
    pins, ranges = constraint_pins(), dependency_ranges()
    assert set(ranges) <= set(pins), f"unpinned: {sorted(set(ranges) - set(pins))}"
    for name, requirement in ranges.items():
        assert Version(pins[name]) in requirement.specifier, f"{name}=={pins[name]} is outside {requirement}"


def test_dockerfile_has_no_entrypoint_and_its_cmd_is_a_gitcap_command():
    instructions = dockerfile()
    # KubeRay replaces the command with `ray start ...` and the launcher runs `docker run IMAGE bash`:
    # an ENTRYPOINT would receive those as its arguments.
    assert not [rest for instruction, rest in instructions if instruction == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for instruction, rest in instructions if instruction == "CMD"]
    assert cmd[0] == "gitcap"
    assert PYPROJECT["project"]["scripts"]["gitcap"] == "jobs.cli:main"
    parse_gitcap(cmd[1:])


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    allowlist = ignore[ignore.index("*") :] if "*" in ignore else None
    for instruction, rest in dockerfile():
        if instruction == "COPY":
            *sources, _ = [part for part in rest.split() if not part.startswith("--")]
            for source in sources:
                if allowlist is not None:
                    assert f"!{source}" in allowlist or f"!{source}/" in allowlist, f"{source} is not in the build context"
                assert (ROOT / source).exists(), source


# --- the cluster launcher --------------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_schema_with_a_cpu_head_and_spot_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"], "losing a spot head loses the cluster"
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["node_config"]["InstanceType"] in EC2_GPU_TYPES}
    assert gpu_types, f"no GPU worker type among {[t['node_config']['InstanceType'] for t in workers.values()]}"
    compute = caption_job().compute
    capacity = 0
    for name, node_type in gpu_types.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        node_gpus, node_cpus = EC2_GPU_TYPES[node_type["node_config"]["InstanceType"]]
        assert compute.cpus_per_worker < node_cpus
        capacity += node_type["max_workers"] * node_gpus
    assert compute.workers * compute.gpus_per_worker <= capacity


def test_cluster_launcher_installs_the_gitcap_wheel_of_this_version_that_it_mounts():
    config = launcher_config()
    wheel = f"gitcap-{VERSION}-py3-none-any.whl"
    installed = re.findall(r"(\S*gitcap-\S+\.whl)", " ".join(config["setup_commands"]))
    assert installed, "setup_commands install no gitcap wheel"
    for remote in installed:
        assert PurePosixPath(remote).name == wheel, f"{remote} is not gitcap {VERSION}"
        assert config["file_mounts"][remote] == f"dist/{wheel}", f"{remote} is not mounted from dist/"
    assert "pip wheel --no-deps -w dist ." in readme(), "the README says how to build the wheel"


def test_cluster_launcher_nodes_run_ray_with_the_token_the_readme_generates():
    config = launcher_config()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "ray get-auth-token --generate" in readme() and "RAY_AUTH_MODE=token" in readme()


# --- the runbook -----------------------------------------------------------------------------


def test_readme_runbook_names_existing_files_and_covers_every_step():
    text = readme()
    for path in set(re.findall(r"\binfra/[\w./-]*\w", text)):
        assert (ROOT / path).exists(), f"the README names {path}, which does not exist"
    for step in ("docker build", "docker push", "kubectl apply", "ray up", "ray job submit", "ray job logs",
                 "gitcap status", "kubectl delete", "ray down"):
        assert step in text, f"the runbook has no `{step}`"


@pytest.mark.parametrize(("where", "argv"), gitcap_commands_in_readme(), ids=lambda v: v if isinstance(v, str) else shlex.join(v))
def test_gitcap_commands_in_the_readme_parse_and_runs_join_the_cluster(where, argv):
    assert argv, "a bare `gitcap` in the README"
    args = parse_gitcap(argv)
    if where == "block" and args is not None and args.command == "run":
        assert args.address == "auto", "a `gitcap run` submitted to a cluster must join it (--address auto)"

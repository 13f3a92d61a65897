"""The deployment files stay valid, consistent with each other and with the code.

cluster.yaml (Ray's cluster launcher), docker/Dockerfile and .dockerignore, k8s/rayjob.yaml
(KubeRay) and the README's "Run on a cluster" commands. Static checks only: no Ray is
started, no Docker daemon or network is used.
"""

import ast
import copy
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from rayprune.cli import parse_config
from rayprune.config import RaySection
from rayprune.stages.resources import plan_from_resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
CLUSTER_TEXT = (ROOT / "cluster.yaml").read_text()
RAYJOB = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
DOCKERIGNORE = (ROOT / ".dockerignore").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README = (ROOT / "README.md").read_text()

#: Ray's JSON schema for cluster-launcher configs, shipped in the ray wheel.
RAY_CLUSTER_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
#: Where Ray looks for the auth token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH
#: is set, and where `ray get-auth-token --generate` writes it: Ray's documentation,
#: "Ray token authentication" (docs.ray.io, ray-security/token-auth), section "What token
#: does Ray use?".
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
#: Memory (GiB) of the EC2 instance types cluster.yaml uses; a new type needs its entry.
INSTANCE_MEMORY_GIB = {"m5.2xlarge": 32, "g5.2xlarge": 32, "m6i.2xlarge": 32}
#: What the job needs in the image besides the installed package (jobs/prune.py's imports
#: come from rayprune; the presets from configs/; pip needs pyproject.toml and README.md).
JOB_FILES = {"rayprune", "jobs", "configs", "pyproject.toml", "README.md"}
LOCAL_STATE = [".venv", ".git", "outputs", "mlflow.db", "mlruns", "__pycache__", "rayprune/__pycache__",
               "rayprune/stages/__pycache__", "outputs/demo/manifest.json", ".venv/bin/python"]


# --------------------------------------------------------------------------- helpers


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in DOCKERFILE.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        instruction, _, args = (buf + stripped).partition(" ")
        out.append((instruction.upper(), args.strip()))
        buf = ""
    return out


def last(instruction: str) -> str:
    values = [args for name, args in dockerfile_instructions() if name == instruction]
    assert values, f"the Dockerfile has no {instruction}"
    return values[-1]


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at && ; ||), each as a token list."""
    tokens = shlex.split(run_args)
    commands, current = [], []
    for token in tokens:
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, arguments after `pip install`) for every pip install in a RUN."""
    found = []
    for i, (name, args) in enumerate(dockerfile_instructions()):
        if name != "RUN":
            continue
        for command in shell_commands(args):
            if Path(command[0]).name.startswith("pip") and command[1:2] == ["install"]:
                found.append((i, command[2:]))
    return found


def install_targets(args: list[str]) -> list[str]:
    """A pip install's arguments without the options that do not name what is installed."""
    return [a for a in args if a in ("-e", "--editable") or not a.startswith("-")]


def copies() -> list[tuple[int, list[str], str]]:
    """(instruction index, sources, destination) of every COPY."""
    out = []
    for i, (name, args) in enumerate(dockerfile_instructions()):
        if name == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            out.append((i, words[:-1], words[-1]))
    return out


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.splitlines() if line.strip() and not line.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob (Go filepath.Match plus `**`) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out (a pattern matching a parent counts)."""
    parts = path.split("/")
    ignored = False
    for raw in dockerignore_patterns():
        negate = raw.startswith("!")
        regex = _glob_regex(raw.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def readme_section(title: str = "## Run on a cluster") -> str:
    start = README.index(f"\n{title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else len(README)]


def readme_commands(text: str) -> list[str]:
    """The lines of the plain code blocks in ``text``, backslash continuations joined."""
    commands = []
    for block in re.findall(r"```\n(.*?)```", text, re.DOTALL):
        buf = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1].strip() + " "
            else:
                commands.append((buf + line.strip()).strip())
                buf = ""
    return [c for c in commands if c]


def readme_command(prefix: str) -> list[str]:
    matches = [c for c in readme_commands(readme_section()) if c.startswith(prefix)]
    assert matches, f'README "Run on a cluster" has no `{prefix} ...` command'
    return matches


def pyproject_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def readme_image_tag() -> str:
    (command,) = readme_command("docker build")
    words = shlex.split(command)
    assert words[:4] == ["docker", "build", "-f", "docker/Dockerfile"], command
    assert words[-1] == ".", "the README builds from the repository root (context `.`)"
    return words[words.index("-t") + 1]


def docker_size_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"'?(\d+(?:\.\d+)?)([bkmg]?)b?'?", text.lower()).groups()
    return int(float(number) * 1024 ** "bkmg".index(unit or "b"))


def k8s_quantity(value) -> float:
    """A Kubernetes quantity (``8``, ``500m``, ``32Gi``) as a number (bytes for memory)."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def run_option_values(options: list[str], flag: str) -> list[str]:
    """Values of ``--flag X`` / ``--flag=X`` in Docker run options."""
    words = [w for option in options for w in shlex.split(option)]
    values = []
    for i, word in enumerate(words):
        if word == flag:
            values.append(words[i + 1])
        elif word.startswith(flag + "="):
            values.append(word[len(flag) + 1:])
    return values


def node_types() -> dict[str, dict]:
    return CLUSTER["available_node_types"]


def worker_types(gpu: bool) -> dict[str, dict]:
    return {name: t for name, t in node_types().items()
            if name != CLUSTER["head_node_type"] and (t["resources"].get("GPU", 0) > 0) == gpu}


def effective_run_options(type_name: str) -> list[str]:
    """Docker run options a node type's container starts with (global + head/worker ones)."""
    docker = {**CLUSTER["docker"], **node_types()[type_name].get("docker", {})}
    role = "head" if type_name == CLUSTER["head_node_type"] else "worker"
    return docker.get("run_options", []) + docker.get(f"{role}_run_options", [])


def ray_pod_templates() -> dict[str, dict]:
    spec = RAYJOB["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def python_call_argument(command: str, function: str, keyword: str):
    """Evaluate ``keyword=`` of the call to ``function`` in a `ray exec ... "python -c ..."` line."""
    inner = shlex.split(command)[3]
    source = shlex.split(inner)[2]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == function:
            for kw in node.keywords:
                if kw.arg == keyword:
                    return eval(compile(ast.Expression(kw.value), "<readme>", "eval"), {"__builtins__": {}})
    return None


# --------------------------------------------------------------------------- cluster.yaml


def validate_cluster_config(config: dict) -> None:
    """What `ray up` checks before touching AWS, through files and rules Ray documents.

    Ray's JSON schema for cluster configs (``ray-schema.json``, shipped in the wheel next
    to ``ray.autoscaler``) catches wrong types, unknown keys and out-of-range values.
    JSON Schema cannot compare one value with another, so the cross-field rules are
    checked here directly: the head node type must be one of the node types (Ray checks
    this in code too), no node type may start more workers than its own ``max_workers``,
    and the node types' ``min_workers`` together may not exceed the global ``max_workers``
    (Ray checks this one too).
    """
    jsonschema.validate(config, RAY_CLUSTER_SCHEMA)
    types = config["available_node_types"]
    if config["head_node_type"] not in types:
        raise ValueError(f"head_node_type {config['head_node_type']!r} is not one of {sorted(types)}")
    for name, t in types.items():
        if t.get("min_workers", 0) > t.get("max_workers", config["max_workers"]):
            raise ValueError(f"{name}: min_workers {t['min_workers']} is above its max_workers")
    if sum(t.get("min_workers", 0) for t in types.values()) > config["max_workers"]:
        raise ValueError("the node types' min_workers add up to more than max_workers")


def test_cluster_yaml_passes_rays_schema_and_cross_field_rules():
    validate_cluster_config(CLUSTER)
    assert CLUSTER["provider"]["type"] == "aws"
    # Ray's AWS defaults (ray/autoscaler/aws/defaults.yaml) add `pip install boto3` to the
    # head's setup; an explicit empty list overrides them (the image already has boto3).
    assert CLUSTER["head_setup_commands"] == []


def _set(path: tuple, value):
    def mutate(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, error", [
    (_set(("available_node_types", "gpu_worker", "min_workers"), "zero"), jsonschema.ValidationError),
    (_set(("available_node_types", "cpu_worker", "max_worker"), 8), jsonschema.ValidationError),
    (_set(("available_node_types", "gpu_worker", "resources", "GPU"), 0.5), jsonschema.ValidationError),
    (_set(("docker", "shm_size"), "12g"), jsonschema.ValidationError),
    (_set(("idle_timeout_minutes",), -1), jsonschema.ValidationError),
    (_set(("head_node_type",), "ray.head.default"), ValueError),
    (_set(("available_node_types", "gpu_worker", "min_workers"), 13), ValueError),
], ids=["type", "unknown-key", "fractional-resource", "unknown-docker-key", "negative-timeout",
        "missing-head-type", "min-above-max"])
def test_cluster_validation_rejects_broken_copies(mutate, error):
    broken = copy.deepcopy(CLUSTER)
    mutate(broken)
    with pytest.raises(error):
        validate_cluster_config(broken)


def test_cluster_has_a_cpu_head_and_gpu_and_cpu_workers_that_scale_from_zero():
    head = node_types()[CLUSTER["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "the head keeps tasks and actors off (it runs the driver)"
    assert head.get("max_workers", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"

    gpu, cpu = worker_types(gpu=True), worker_types(gpu=False)
    assert len(gpu) == 1 and cpu, "one GPU worker type for training, CPU worker types for the rest"
    for name, t in {**gpu, **cpu}.items():
        assert t["min_workers"] == 0, f"{name} must scale from zero"
        assert t["max_workers"] >= 1
        assert t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", f"{name}: spot"
    (gpu_type,) = gpu.values()
    assert gpu_type["node_config"]["InstanceType"].startswith(("g", "p")), "a GPU instance family"
    assert max(t["max_workers"] for t in cpu.values()) >= gpu_type["max_workers"], "CPU workers scale wider"
    assert CLUSTER["max_workers"] >= sum(t["max_workers"] for t in {**gpu, **cpu}.values())
    assert CLUSTER["idle_timeout_minutes"] > 0


def test_training_workers_fit_on_a_gpu_node_at_every_cluster_size():
    """The job gives each training worker up to the largest node's CPUs: that must fit a GPU node."""
    (gpu_type,) = worker_types(gpu=True).values()
    cpu_types = list(worker_types(gpu=False).values())
    gpu_cpus, node_gpus = gpu_type["resources"]["CPU"], gpu_type["resources"]["GPU"]
    for n_gpu in range(1, gpu_type["max_workers"] + 1):
        for n_cpu in range(sum(t["max_workers"] for t in cpu_types) + 1):
            cpu_node = max(t["resources"]["CPU"] for t in cpu_types) if n_cpu else 0
            total_cpus = n_gpu * gpu_cpus + n_cpu * cpu_node
            plan = plan_from_resources(RaySection(), total_cpus, n_gpu * node_gpus, max(gpu_cpus, cpu_node))
            assert plan.train_use_gpu and plan.train_workers == n_gpu * node_gpus
            assert plan.train_cpus_per_worker <= gpu_cpus, (n_gpu, n_cpu, plan)


def test_cluster_runs_the_project_image_with_enough_shared_memory():
    assert CLUSTER["docker"]["image"] == readme_image_tag()
    assert CLUSTER["docker"]["container_name"]
    for name, t in node_types().items():
        sizes = run_option_values(effective_run_options(name), "--shm-size")
        assert len(sizes) == 1, f"{name}: one --shm-size (got {sizes})"
        instance = t["node_config"]["InstanceType"]
        assert instance in INSTANCE_MEMORY_GIB, f"add {instance}'s memory to INSTANCE_MEMORY_GIB"
        share = docker_size_bytes(sizes[0]) / (INSTANCE_MEMORY_GIB[instance] * 2**30)
        # Ray's object store takes 30% of memory by default and lives in /dev/shm.
        assert 0.3 <= share <= 0.5, f"{name}: /dev/shm is {share:.0%} of {instance}'s memory"
    for name in worker_types(gpu=True):
        assert "all" in run_option_values(effective_run_options(name), "--gpus")


def test_cluster_keeps_token_authentication_on_and_ships_the_token():
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_TEXT
    for name in node_types():
        env = run_option_values(effective_run_options(name), "--env")
        env += run_option_values(effective_run_options(name), "-e")
        assert "RAY_AUTH_MODE=token" in env, f"{name}: containers must run with RAY_AUTH_MODE=token"
    token_dir = str(PurePosixPath(DEFAULT_TOKEN_PATH).parent)
    assert CLUSTER["file_mounts"].get(token_dir) == token_dir, \
        f"file_mounts must copy the local {token_dir} (where `ray get-auth-token --generate` writes) to {token_dir}"
    assert "ray get-auth-token --generate" in readme_commands(readme_section())


def test_cluster_start_commands_start_an_autoscaling_head_and_join_workers_to_it():
    head = " ".join(CLUSTER["head_start_ray_commands"])
    worker = " ".join(CLUSTER["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head, "without it the head does not autoscale"
    port = re.search(r"--port=(\d+)", head).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker


def test_cluster_nodes_share_the_storage_the_job_writes_to():
    mounts = run_option_values(CLUSTER["docker"]["run_options"], "--volume")
    shared = {m.split(":")[1] for m in mounts if m.split(":")[0] == m.split(":")[1]}
    assert shared, "a host directory mounted into every container (the shared file system)"
    init = " ".join(CLUSTER["initialization_commands"])
    assert "mount -t nfs4" in init and any(path in init for path in shared)
    uid = dockerfile_uid()
    assert f"chown {uid}:{uid}" in init, "the image's user must own the shared mount"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_uid() -> int:
    useradd = [c for name, args in dockerfile_instructions() if name == "RUN"
               for c in shell_commands(args) if c[0] == "useradd"]
    assert len(useradd) == 1
    return int(useradd[0][useradd[0].index("--uid") + 1])


def test_image_is_cuda_based_with_the_python_pyproject_requires():
    import torch

    base = [args for name, args in dockerfile_instructions() if name == "FROM"][-1].split()[0]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(?:cudnn-)?(?:runtime|base)-ubuntu[\d.]+", base)
    assert match, f"the final image must build on an nvidia/cuda runtime Ubuntu image, not {base}"
    if torch.version.cuda:  # the CUDA line of the pinned torch wheels
        assert match.group(1) == torch.version.cuda.split(".")[0], (base, torch.version.cuda)
    venvs = re.findall(r"(python3\.\d+) -m venv", DOCKERFILE)
    assert venvs, "the Dockerfile creates its virtualenv with an explicit python3.X"
    version = venvs[0].removeprefix("python")
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version + ".0")
    venv = re.search(r"python3\.\d+ -m venv (\S+)", DOCKERFILE).group(1)
    env = " ".join(args for name, args in dockerfile_instructions() if name == "ENV")
    assert re.search(rf"\bPATH={re.escape(venv)}/bin:", env), "the virtualenv's python and ray come first on PATH"


def test_dockerfile_installs_the_project_the_way_the_readme_does():
    quick_start = [c for c in readme_commands(README) if ".venv/bin/pip install" in c and "[test]" not in c]
    assert quick_start, "the README's install command"
    readme_args = shlex.split(quick_start[0].split(".venv/bin/pip install", 1)[1].split("&&")[0])
    installs = pip_installs()
    project = [(i, args) for i, args in installs if "." in args]
    assert len(project) == 1, f"one `pip install` of the repository: {installs}"
    index, args = project[0]
    assert install_targets(args) == install_targets(readme_args) == ["-e", "."]
    copied = {src for i, sources, _ in copies() if i < index for src in sources}
    assert {"pyproject.toml", "rayprune"} <= copied, "pyproject.toml and the package are copied before the install"


def test_dockerfile_neither_repeats_nor_contradicts_pyproject_pins():
    pinned = pyproject_requirements()
    for _, args in pip_installs():
        for target in install_targets(args):
            if target in ("-e", "--editable", "."):
                continue
            name = canonicalize_name(Requirement(target).name)
            assert name not in pinned, \
                f"the Dockerfile installs {target}; {name} comes from pyproject.toml ({pinned[name]})"
    assert not re.search(r"--(extra-)?index-url|download\.pytorch\.org", DOCKERFILE), \
        "torch must come from the same index as the README install (a CPU-only index would break GPU nodes)"
    assert str(pinned["torch"].specifier) == "==2.14.1" and str(pinned["torchvision"].specifier) == "==0.29.1"


def test_dockerfile_copies_what_the_job_needs_and_the_context_has_it():
    sources = {src.rstrip("/") for _, srcs, _ in copies() for src in srcs}
    assert JOB_FILES <= sources, f"missing in the image: {JOB_FILES - sources}"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    assert not dockerignored("rayprune/stages/resources.py") and not dockerignored("configs/cifar10-linf.yaml")


@pytest.mark.parametrize("path", LOCAL_STATE)
def test_dockerignore_keeps_local_state_out(path):
    assert dockerignored(path), f".dockerignore must exclude {path}"


def test_image_runs_as_a_non_root_user_with_home_declared():
    user = last("USER")
    assert user not in ("root", "0")
    env = " ".join(args for name, args in dockerfile_instructions() if name == "ENV")
    # The cluster launcher reads HOME from the image to place file_mounts such as ~/.ray.
    assert re.search(rf"\bHOME=/home/{user}\b", env)
    assert last("WORKDIR").startswith(f"/home/{user}/")
    assert dockerfile_uid() == 1000


def test_image_has_what_ray_nodes_need_and_no_entrypoint():
    apt = [c for name, args in dockerfile_instructions() if name == "RUN"
           for c in shell_commands(args) if c[:2] == ["apt-get", "install"]]
    packages = {p for c in apt for p in c if not p.startswith("-")}
    # rsync: file sync into the container; openssh-client: the head's autoscaler reaches
    # workers; wget: KubeRay's probes.
    assert {"rsync", "openssh-client", "wget"} <= packages
    others = {canonicalize_name(Requirement(t).name) for _, args in pip_installs()
              for t in install_targets(args) if t not in ("-e", "--editable", ".")}
    assert "boto3" in others, "the head's autoscaler needs boto3 for the AWS node provider"
    names = [name for name, _ in dockerfile_instructions()]
    assert "ENTRYPOINT" not in names, "the launcher runs `docker run IMAGE bash`; KubeRay sets the command"
    assert json.loads(last("CMD")) == ["bash"]


# --------------------------------------------------------------------------- k8s/rayjob.yaml


def rayjob_config():
    words = shlex.split(RAYJOB["spec"]["entrypoint"])
    assert words[:2] == ["python", "jobs/prune.py"]
    config_file = words[words.index("--config") + 1]
    assert (ROOT / config_file).is_file() and config_file.startswith("configs/")
    config, _ = parse_config(words[2:])
    return config


def shared_mount_paths() -> set[str]:
    paths = None
    for spec in ray_pod_templates().values():
        pvc = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] in pvc}
        paths = mounts if paths is None else paths & mounts
    return paths


def test_rayjob_runs_the_job_entry_point_on_shared_storage():
    assert RAYJOB["apiVersion"] == "ray.io/v1" and RAYJOB["kind"] == "RayJob"
    config = rayjob_config()
    shared = shared_mount_paths()
    assert shared, "every Ray pod mounts the same PersistentVolumeClaim"
    for path in (config.output_dir, config.pool.path, config.evaluation.test_pool):
        assert Path(path).is_absolute() and any(path.startswith(s + "/") for s in shared), path
    spec = RAYJOB["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == last("WORKDIR"), "relative paths resolve in the image's project directory"
    uri = runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    assert uri.startswith(("http://", "https://")), "a tracking server, not a local SQLite file"


def test_rayjob_pods_use_the_image_shared_memory_and_the_token_secret():
    cluster_spec = RAYJOB["spec"]["rayClusterSpec"]
    assert cluster_spec["authOptions"]["mode"] == "token"
    secret = cluster_spec["authOptions"]["secretName"]
    for group, spec in ray_pod_templates().items():
        container = spec["containers"][0]
        assert container["image"] == CLUSTER["docker"]["image"] == readme_image_tag(), group
        shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert len(shm) == 1, f"{group}: an in-memory emptyDir for /dev/shm"
        assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in container["volumeMounts"], group
        share = k8s_quantity(shm[0]["emptyDir"]["sizeLimit"]) / k8s_quantity(container["resources"]["limits"]["memory"])
        assert 0.3 <= share <= 0.5, f"{group}: /dev/shm is {share:.0%} of the pod's memory"
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", group
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{group}: the token must not be written into the manifest"
        assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}, group
        assert spec["securityContext"]["fsGroup"] == dockerfile_uid(), group


def test_rayjob_cluster_has_a_cpu_head_a_gpu_group_and_a_cpu_group_that_fit_the_job():
    cluster_spec = RAYJOB["spec"]["rayClusterSpec"]
    ray_spec = pyproject_requirements()["ray"].specifier
    assert ray_spec.contains(cluster_spec["rayVersion"]), (cluster_spec["rayVersion"], ray_spec)
    head = cluster_spec["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head["rayStartParams"].get("num-cpus") == "0"

    groups = {}
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups[group["groupName"]] = (k8s_quantity(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0)), group)
        if not cluster_spec.get("enableInTreeAutoscaling", False):
            # The job sizes itself from the resources present when it starts: no scaling up later.
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1, group["groupName"]
    gpu = [g for g in groups.values() if g[1] > 0]
    cpu = [g for g in groups.values() if g[1] == 0]
    assert len(gpu) == 1 and cpu
    (gpu_cpus, pod_gpus, gpu_group) = gpu[0]
    total_cpus = sum(c * g["replicas"] for c, _, g in groups.values())
    total_gpus = pod_gpus * gpu_group["replicas"]
    plan = plan_from_resources(RaySection(), total_cpus, total_gpus, max(c for c, _, _ in groups.values()))
    assert plan.train_use_gpu and plan.train_workers == total_gpus
    assert plan.train_cpus_per_worker <= gpu_cpus, plan


# --------------------------------------------------------------------------- README


def test_readme_builds_the_image_the_deployments_use():
    tag = readme_image_tag()
    assert tag.rsplit(":", 1)[1] == PYPROJECT["project"]["version"], "the image tag is the package version"
    assert any(shlex.split(c) == ["docker", "push", tag] for c in readme_command("docker push"))
    assert "ray up cluster.yaml" in readme_commands(readme_section())
    assert "kubectl apply -f k8s/rayjob.yaml" in readme_commands(readme_section())


def test_readme_creates_the_secret_the_rayjob_reads():
    (command,) = readme_command("kubectl create secret generic")
    words = shlex.split(command)
    secret = RAYJOB["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
    assert words[4] == secret
    literal = [w for w in words if w.startswith("--from-literal=")]
    assert literal and literal[0].split("=")[1] == "auth_token"


def test_readme_job_submission_parses_and_writes_to_shared_storage():
    (command,) = readme_command("ray job submit")
    words = shlex.split(command)
    assert words[words.index("--address") + 1].startswith("http://")
    assert words[words.index("--working-dir") + 1] == "."
    runtime_env = json.loads(words[words.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert {".venv", ".git", "outputs", "mlruns", "mlflow.db"} <= set(runtime_env["excludes"])
    entry = words[words.index("--") + 1:]
    assert entry[:2] == ["python", "jobs/prune.py"]
    assert entry[2:4] == shlex.split(RAYJOB["spec"]["entrypoint"])[2:4], "the same preset as the RayJob"
    config, _ = parse_config(entry[2:])
    shared = {m.split(":")[1] for m in run_option_values(CLUSTER["docker"]["run_options"], "--volume")}
    for path in (config.output_dir, config.pool.path, config.evaluation.test_pool):
        assert any(path.startswith(s + "/") for s in shared), f"{path} is not on the cluster's shared storage"
    # The registered model the README loads is the one this config registers.
    uris = re.findall(r'models:/([^@"]+)@(\w+)', readme_section())
    assert uris and all(name == config.tracking.registered_model for name, _ in uris), uris
    assert {alias for _, alias in uris} <= {"champion", "candidate"}


def test_readme_requests_workers_the_cluster_can_provide():
    """The submitted job asks the autoscaler for what cluster.yaml's worker types can hold."""
    from rayprune.stages.resources import autoscaler_bundles

    (command,) = readme_command("ray job submit")
    words = shlex.split(command)
    config, _ = parse_config(words[words.index("--") + 3:])
    assert config.ray.request_gpus >= 1 and config.ray.request_cpus >= config.ray.request_gpus
    types = [t["resources"] for t in {**worker_types(gpu=True), **worker_types(gpu=False)}.values()]
    for bundle in autoscaler_bundles(config.ray):
        assert any(all(t.get(k, 0) >= v for k, v in bundle.items()) for t in types), f"{bundle} fits no worker type"
    (gpu_type,) = worker_types(gpu=True).values()
    assert config.ray.request_gpus <= gpu_type["max_workers"] * gpu_type["resources"]["GPU"]
    capacity = sum(t["max_workers"] * t["resources"].get("CPU", 0)
                   for t in {**worker_types(gpu=True), **worker_types(gpu=False)}.values())
    assert config.ray.request_cpus <= capacity
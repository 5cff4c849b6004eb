"""TorchX launchers: the local profile really runs 2 ranks; every other profile renders through TorchX's
dry run into the scheduler request it would submit; bad profiles fail with errors that name them."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx.runner import get_runner

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.embeddings.store import BehaviourStore
from bahe.launchers import components, submit
from bahe.launchers.profiles import ProfileError, get_profile, load_profiles, parse_profile, render
from tests.llm_fixtures import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--data_dir", "/data/ml", "--out", "/data/runs/bahe", "--arm", "token_level", "--steps", "100",
              "--", "--batch-size", "64"]
TRAIN_MODULE_ARGS = ["--data-dir", "/data/ml", "--out", "/data/runs/bahe", "--arm", "token_level", "--steps", "100",
                     "--batch-size", "64"]


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # tests/conftest.py


def dryrun(app, scheduler: str, cfg: dict):
    """TorchX's dry run of ``app``: the request the scheduler would get (no cluster is contacted)."""
    with get_runner() as runner:
        return runner.dryrun(app, scheduler, cfg=cfg)


def torchrun_command(args: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """Split a ddp role's ``["-c", "torchrun ..."]`` into (torchrun options, module, module args)."""
    assert args[0] == "-c"
    words = shlex.split(args[1])
    assert words[0] == "torchrun"
    at = words.index("-m")
    options = dict(zip(words[1:at:2], words[2:at:2]))
    return options, words[at + 1], words[at + 2:]


def write_samples(path: Path, tiny_schema, n: int) -> Path:
    sequences = [[f"Pay {w} order {i * 7 + j}" for j, w in enumerate(("coffee", "metro", "taxi", "books"))]
                 for i in range(n)]
    with SampleWriter(path, tiny_schema) as writer:
        writer.write({"label": [i % 2 for i in range(n)], "timestamp": list(range(n)), "user_id": list(range(n)),
                      "item_id": list(range(n)), "cat_genre": [[] for _ in range(n)], "dense_age": [1.0] * n,
                      "item_text": [f"Title {i}" for i in range(n)], "seq_liked": sequences,
                      "seq_disliked": [s[::-1] for s in sequences]})
    return path


@pytest.mark.integration
def test_local_profile_runs_two_ranks_to_completion(tmp_path, tiny_schema, capsys):
    """`launchers.submit --profile local encode` runs torchrun with 2 ranks through the Runner API and
    waits: both ranks start and log, the job SUCCEEDS and the store opens."""
    model = make_tiny_llama(tmp_path / "tiny-llama")
    data = write_samples(tmp_path / "a.parquet", tiny_schema, 8)
    logs = tmp_path / "logs"
    code = submit.main(["--profile", "local", "--cfg", f"log_dir={logs}", "encode", "--",
                        "--store", str(tmp_path / "store"), "--data", str(data), "--model", str(model), "--k", "2",
                        "--device", "cpu", "--chunk_texts", "8", "--", "--batch-tokens", "64"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    handle = next(line for line in out.splitlines() if line.startswith("local_cwd://"))
    app_dir = logs / "torchx" / handle.rsplit("/", 1)[1]
    assert (app_dir / "SUCCESS").exists()
    # torchelastic gives each local rank its own log folder; both ranks wrote to theirs
    rank_dirs = sorted(p.parent.name for p in app_dir.glob("torchelastic/encode/*/attempt_0/*/stderr.log"))
    assert rank_dirs == ["0", "1"]
    combined = (app_dir / "encode" / "0" / "combined.log").read_text()
    assert "[0]:" in combined and "[1]:" in combined  # torchrun's --tee prefixes each rank's lines
    assert "store version v000001" in out  # rank 0's report, streamed while waiting
    store = BehaviourStore.open(tmp_path / "store")
    assert store.version == "v000001" and store.rows_count == 2 + 8 * 4 + 8
    store.verify()


def test_local_profile_request(tmp_path):
    """The local profile: 1 replica of `torchrun --nproc_per_node 2` in this checkout, this venv's bin on PATH."""
    profile = get_profile("local")
    app, cfg = render(profile, "evaluate", ["--checkpoint", "runs/train", "--", "--split", "test"],
                      {"log_dir": str(tmp_path)})
    info = dryrun(app, profile.scheduler, cfg)
    (replica,) = info.request.role_params["evaluate"]
    options, module, args = torchrun_command(replica.args[1:])
    assert replica.args[0] == "bash" and options["--nnodes"] == "1" and options["--nproc_per_node"] == "2"
    assert (module, args) == ("bahe.launchers.evaluate", ["--checkpoint", "runs/train", "--split", "test"])
    assert replica.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert replica.env["OMP_NUM_THREADS"] == "1" and info.request.log_dir.startswith(str(tmp_path))


def test_gpu_node_profile_renders_a_docker_request():
    profile = get_profile("gpu-node")
    app, cfg = render(profile, "train", TRAIN_ARGS)
    request = dryrun(app, profile.scheduler, cfg).request
    (container,) = request.containers  # one node
    assert container.image == profile.image == "ghcr.io/your-org/bahe-torchrec:latest"
    (gpus,) = container.kwargs["device_requests"]
    assert gpus["Count"] == 8 and "compute" in gpus["Capabilities"][0]
    options, module, args = torchrun_command(container.command[1:])
    assert options["--nnodes"] == "1" and options["--nproc_per_node"] == "8"
    assert options["--max_restarts"] == "1"  # a dead rank is restarted and resumes from the last checkpoint
    assert (module, args) == ("bahe.launchers.train", TRAIN_MODULE_ARGS)
    assert container.kwargs["nano_cpus"] == 64 * 10**9 and container.kwargs["mem_limit"] == "512000m"
    assert container.kwargs["environment"]["OMP_NUM_THREADS"] == "8"
    assert [(m["Source"], m["Target"]) for m in container.kwargs["mounts"]] == [("/data", "/data")]


def test_k8s_profile_renders_a_volcano_job():
    profile = get_profile("k8s")
    app, cfg = render(profile, "train", TRAIN_ARGS)
    assert cfg["queue"] == "default" and cfg["namespace"] == "default"
    job = dryrun(app, profile.scheduler, cfg).request.resource
    assert job["kind"] == "Job" and job["spec"]["schedulerName"] == "volcano" and job["spec"]["queue"] == "default"
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 4  # one Volcano task (pod) per node
    for i, task in enumerate(tasks):
        pod = task["template"]
        (container,) = pod.spec.containers
        assert container.image == profile.image
        assert container.resources.limits["nvidia.com/gpu"] == "8" and container.resources.limits["cpu"] == "64000m"
        options, module, args = torchrun_command(container.command[1:])
        assert options["--nnodes"] == "4" and options["--nproc_per_node"] == "8"
        assert options["--rdzv_endpoint"].endswith(":29500")  # multi-node: rendezvous on the first pod
        assert (module, args) == ("bahe.launchers.train", TRAIN_MODULE_ARGS)
        env = {e.name: e.value for e in container.env}
        assert env["OMP_NUM_THREADS"] == "8" and env["NCCL_DEBUG"] == "WARN"
        assert any(v.persistent_volume_claim and v.persistent_volume_claim.claim_name == "bahe-data"
                   for v in pod.spec.volumes)
        assert pod.metadata.labels["torchx.pytorch.org/replica-id"] == str(i)


def test_slurm_profile_renders_an_sbatch_script(tmp_path):
    profile = get_profile("slurm")
    data = ["/shared/ml/train.parquet", "/shared/ml/valid.parquet"]
    app, cfg = render(profile, "encode", ["--store", "/shared/store", "--data", ",".join(data)])
    request = dryrun(app, profile.scheduler, cfg).request
    assert request.cmd[:2] == ["sbatch", "--parsable"]
    assert len(request.replicas) == 4  # a heterogeneous job of one group per node
    for replica in request.replicas.values():
        sbatch = replica.sbatch_opts
        assert sbatch["partition"] == "gpu" and sbatch["time"] == "24:00:00"
        assert sbatch["gpus-per-task"] == "8" and sbatch["cpus-per-task"] == "64" and sbatch["ntasks-per-node"] == "1"
        options, module, args = torchrun_command(replica.args)
        assert options["--nnodes"] == "4" and options["--nproc_per_node"] == "8"
        assert module == "bahe.embeddings.cli"
        assert args == ["build", "--store", "/shared/store", "--data", *data, "--device", "auto", "--quiet"]
    script = request.materialize()
    assert script.count("#SBATCH hetjob") == 3 and "--partition=gpu" in script and "srun " in script


def test_submit_dryrun_prints_the_request(capsys):
    assert submit.main(["--profile", "slurm", "--cfg", "partition=a100", "--dryrun", "train", "--", *TRAIN_ARGS]) == 0
    out = capsys.readouterr().out
    assert "=== SCHEDULER REQUEST (slurm) ===" in out and "--partition=a100" in out and "-m bahe.launchers.train" in out


def test_train_restarts_are_a_component_argument():
    app = components.train(data_dir="/d", out="/o", max_restarts=3)
    options, _, _ = torchrun_command(app.roles[0].args)
    assert options["--max_restarts"] == "3"
    options, _, _ = torchrun_command(components.train(data_dir="/d", out="/o", max_restarts=0).roles[0].args)
    assert "--max_restarts" not in options
    with pytest.raises(ValueError, match="max_restarts must be >= 0"):
        components.train(data_dir="/d", out="/o", max_restarts=-1)


def test_components_check_their_arguments():
    with pytest.raises(ValueError, match="--arm must be one of bahe, token_level, dlrm"):
        components.train(data_dir="d", out="o", arm="bert")
    with pytest.raises(ValueError, match="at least one"):
        components.encode(store="s", data=[])
    app = components.evaluate("--split", "test", j="2x4", gpu=4, env={"OMP_NUM_THREADS": "4"})
    role = app.roles[0]
    assert role.name == "evaluate" and role.num_replicas == 2 and role.resource.gpu == 4
    assert role.env["OMP_NUM_THREADS"] == "4" and role.env["TOKENIZERS_PARALLELISM"] == "false"
    assert torchrun_command(role.args)[1:] == ("bahe.launchers.evaluate", ["--split", "test"])


def test_plain_torchx_run_uses_torchxconfig():
    """`torchx run launchers/components.py:...` works from the repository root with .torchxconfig's defaults."""
    torchx = [str(Path(sys.executable).parent / "torchx"), "run"]
    help_text = subprocess.run([*torchx, "launchers/components.py:train", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    assert "--arm" in help_text.stdout and "token_level" in help_text.stdout
    dry = subprocess.run([*torchx, "--dryrun", "launchers/components.py:encode", "--store", "/tmp/s", "--data",
                          "a.parquet,b.parquet"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "local_cwd://" in dry.stdout and "runs/torchx" in dry.stdout  # scheduler and log_dir from .torchxconfig
    assert "--nproc_per_node 2" in dry.stdout and "'memMB': 8192" in dry.stdout


def test_torchxconfig_agrees_with_the_profiles():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".torchxconfig")
    profiles = load_profiles()
    for name in ("local", "k8s", "slurm"):
        profile = profiles[name]
        assert {k: str(v) for k, v in profile.scheduler_args.items()} == dict(config[profile.scheduler]), name
    local = profiles["local"]
    for component in ("encode", "train", "evaluate"):
        section = config[f"component:launchers/components.py:{component}"]
        assert (section["j"], int(section["cpu"]), int(section["memMB"])) == (local.j, local.cpu, local.memMB)


BASE = {"scheduler": "slurm", "accelerator": "gpu", "nodes": 2, "nproc_per_node": 8,
        "resources": {"cpu": 64, "memMB": 512000, "gpu": 8}, "image": ".",
        "scheduler_args": {"partition": "gpu", "time": "1:00:00"}}


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


@pytest.mark.parametrize(("raw", "message"), [
    (_with("scheduler", "pbs"), "unknown scheduler 'pbs'"),
    (_with("nodes", 0), "nodes must be >= 1, got 0"),
    (_with("nproc_per_node", "8"), "nproc_per_node must be an integer"),
    (_with("scheduler_args.partition", None), "scheduler slurm requires scheduler_args partition"),
    (_with("scheduler_args.partion", "gpu"), "scheduler_args.partion is not a run option of slurm"),
    (_with("scheduler_args.time", 24), "scheduler_args.time must be of type str"),
    (_with("resources.gpu", 0), "accelerator gpu needs resources.gpu >= 1"),
    (_with("resources.gpu", None), "accelerator gpu needs resources.gpu >= 1"),
    (_with("resources.gpu", 4), "nproc_per_node 8 exceeds resources.gpu 4"),
    (_with("accelerator", "tpu"), "accelerator must be one of cpu, gpu"),
    (_with("image", None), "missing required key(s) image"),
    (_with("resources.memMB", None), "missing resources.memMB"),
    (_with("replicas", 2), "unknown key(s) replicas"),
    ({**_with("scheduler", "kubernetes"), "scheduler_args": {"namespace": "ml"}, "image": "repo/img:1"},
     "scheduler kubernetes requires scheduler_args queue"),
    ({**_with("scheduler", "kubernetes"), "scheduler_args": {"queue": "q"}}, "image must name one, not the path '.'"),
    ({**BASE, "accelerator": "cpu"}, "accelerator cpu with resources.gpu 8"),
])
def test_bad_profiles_fail_with_errors_that_name_them(raw, message):
    with pytest.raises(ProfileError) as err:
        parse_profile("broken", raw)
    assert str(err.value).startswith("profile 'broken': ") and message in str(err.value)


def test_bad_profiles_file_and_names(tmp_path, capsys):
    path = tmp_path / "torchx.yaml"
    path.write_text(yaml.safe_dump({"profiles": {"good": BASE, "bad": _with("nodes", -1)}}))
    with pytest.raises(ProfileError, match="profile 'bad': nodes must be >= 1"):
        load_profiles(path)
    path.write_text("local: {scheduler: local_cwd}\n")
    with pytest.raises(ProfileError, match="top-level 'profiles:'"):
        load_profiles(path)
    with pytest.raises(ProfileError, match="no profile 'nope'.*local, gpu-node, k8s, slurm"):
        get_profile("nope")
    assert submit.main(["--profile", "nope", "--dryrun", "train"]) == 2
    assert "no profile 'nope'" in capsys.readouterr().err
    assert submit.main(["--profile", "slurm", "--cfg", "partion=x", "--dryrun", "train", "--", *TRAIN_ARGS]) == 2
    assert "partion is not a run option of slurm" in capsys.readouterr().err

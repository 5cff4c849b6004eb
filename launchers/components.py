"""TorchX components of the BAHE pipeline: ``encode``, ``train``, ``evaluate`` and ``predict``.

Each component is a typed function that returns a :class:`torchx.specs.AppDef` built on TorchX's
``dist.ddp``: one role of ``nodes x processes-per-node`` ranks started by ``torchrun``. The
``Args:`` of each docstring are what ``--help`` shows::

    torchx run launchers/components.py:train --help
    torchx run -s local_cwd launchers/components.py:encode --store stores/ml --data a.parquet,b.parquet
    torchx run -s local_cwd launchers/components.py:train --data_dir runs/demo/data --out runs/train -- --batch-size 64

Lists are comma-separated (``--data a,b``), maps are ``K=V,K2=V2`` (``--env FOO=1``), and every
argument after ``--`` goes unchanged to the program (``script_args``). ``python -m bahe.launchers.submit``
fills the launch arguments (``j``, ``image``, ``cpu``, ``gpu``, ``memMB``, ``env``, ...) from a profile
of ``torchx.yaml``; ``torchx run`` takes them from ``.torchxconfig`` or the command line.

Multi-node: ``--j 2x1`` starts 2 torchrun agents of 1 rank each that rendezvous (c10d) on the first
node's ``rdzv_port``; under ``local_cwd`` both run on this machine and meet on ``localhost`` (give a free
``--rdzv_port`` when two such jobs share it). The planner then sees 2 hosts (docs/launching.md).

This file imports nothing from the project, so that ``torchx run`` can load it by path.
"""

# torchx 0.7.0 reads component signatures only when they are spelled with typing's Dict, List
# and Optional (its linter and argument decoder know no ``list[str]`` or ``X | None``).
# ruff: noqa: UP006, UP007, UP035, UP045

from typing import Dict, List, Optional

from torchx import specs
from torchx.components import dist

ENCODE_MODULE = "bahe.embeddings.cli"
TRAIN_MODULE = "bahe.launchers.train"
EVALUATE_MODULE = "bahe.launchers.evaluate"
PREDICT_MODULE = "bahe.launchers.predict"
ARMS = ("bahe", "token_level", "dlrm")
DEFAULT_IMAGE = "bahe-torchrec:latest"
# Environment every rank gets unless ``env`` says otherwise: one OpenMP thread per rank (ranks share
# the node's cores), no tokenizer thread pools inside ranks, unbuffered output for live logs.
BASE_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _option(flag: str, value: object) -> List[str]:
    """``[flag, str(value)]``, or nothing when ``value`` is None."""
    return [] if value is None else [flag, str(value)]


def _launch(role: str, module: str, module_args: List[str], *, name: str, j: str, image: str, cpu: int, gpu: int,
            memMB: int, env: Optional[Dict[str, str]], max_retries: int, rdzv_port: int, rdzv_backend: str,
            mounts: Optional[List[str]], debug: bool, max_restarts: int = 0) -> specs.AppDef:
    """``dist.ddp`` running ``python -m module module_args``, with BASE_ENV and the role renamed to ``role``;
    ``max_restarts`` > 0 lets torchrun restart the rank group in place after a rank dies."""
    if max_restarts < 0:
        raise ValueError(f"{role}: max_restarts must be >= 0, got {max_restarts}")
    if gpu < 0 or cpu < 1 or memMB < 1:
        raise ValueError(f"{role}: cpu and memMB must be >= 1 and gpu >= 0 (got cpu={cpu}, gpu={gpu}, memMB={memMB})")
    app = dist.ddp(*module_args, m=module, name=name, image=image, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
                   env={**BASE_ENV, **(env or {})}, max_retries=max_retries, rdzv_port=rdzv_port,
                   rdzv_backend=rdzv_backend, mounts=mounts, debug=debug)
    app.roles[0].name = role  # ddp names the role after the module's last part ("cli", "train")
    if max_restarts:  # ddp has no torchrun --max_restarts option: add it to the torchrun command it built
        command = app.roles[0].args[1]
        assert command.startswith("torchrun "), command
        app.roles[0].args[1] = f"torchrun --max_restarts {max_restarts} " + command[len("torchrun "):]
    return app


def encode(
    *script_args: str,
    store: str,
    data: List[str],
    model: Optional[str] = None,
    k: Optional[int] = None,
    device: str = "auto",
    chunk_texts: Optional[int] = None,
    quiet: bool = True,
    name: str = "bahe/encode",
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """Build or refresh a behaviour embedding store (``python -m bahe.embeddings.cli build``) on every rank.

    The ranks split the store's chunks between them; an interrupted build resumes when run again.

    Args:
        script_args: further ``embeddings.cli build`` flags, after ``--`` (e.g. ``-- --pooling last --max-tokens 128``)
        store: store root folder, as the ranks see it (created if missing)
        data: sample .parquet files, comma-separated, as the ranks see them
        model: model alias (smollm2-135m, minilm-l6) or Hugging Face folder; None: the encoder's default
        k: shallow frozen layers that encode a text; None: the encoder's default (6)
        device: cpu, cuda, cuda:N or auto
        chunk_texts: texts per resumable chunk and per unit of work across ranks; None: the encoder's default
        quiet: hide the progress bar (logs of remote jobs stay readable)
        name: job name, ``{experiment}/{run}``
        j: {nnodes}x{nproc_per_node}: nodes times ranks per node (one rank per GPU on GPU nodes)
        image: container image (Docker, Kubernetes) or directory (Slurm); local_cwd ignores it
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: environment of every rank, K=V,K2=V2; overrides OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false
        max_retries: scheduler retries of the whole job
        rdzv_port: rendezvous port on the first node (multi-node only)
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        mounts: volumes, type=bind|volume,src=...,dst=...[,readonly] (container schedulers)
        debug: turn on torch's distributed debug flags
    """
    if not data:
        raise ValueError("encode: --data needs at least one .parquet file")
    args = ["build", "--store", store, "--data", *data, *_option("--model", model), *_option("--k", k),
            "--device", device, *_option("--chunk-texts", chunk_texts), *(["--quiet"] if quiet else []), *script_args]
    return _launch("encode", ENCODE_MODULE, args, name=name, j=j, image=image, cpu=cpu, gpu=gpu, memMB=memMB,
                   env=env, max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
                   debug=debug)


def train(
    *script_args: str,
    data_dir: str,
    out: str,
    arm: str = "bahe",
    store: Optional[str] = None,
    steps: Optional[int] = None,
    name: str = "bahe/train",
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 1,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """Train one arm of the CTR model on every rank (``python -m bahe.launchers.train``).

    Args:
        script_args: further trainer flags, after ``--`` (passed unchanged, e.g. ``-- --batch-size 64``)
        data_dir: folder of the train/valid/test sample .parquet files, as the ranks see it
        out: output folder (checkpoints, TensorBoard events, metrics)
        arm: model arm: bahe (behaviour store vectors), token_level (LLM over the tokens) or dlrm (no text)
        store: behaviour store root (the bahe arm reads its vectors from it)
        steps: training steps; None: the trainer's default
        name: job name, ``{experiment}/{run}``
        j: {nnodes}x{nproc_per_node}: nodes times ranks per node (one rank per GPU on GPU nodes)
        image: container image (Docker, Kubernetes) or directory (Slurm); local_cwd ignores it
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: environment of every rank, K=V,K2=V2; overrides OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false
        max_retries: scheduler retries of the whole job
        max_restarts: torchrun restarts of the ranks after one dies (each resumes from the last checkpoint)
        rdzv_port: rendezvous port on the first node (multi-node only)
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        mounts: volumes, type=bind|volume,src=...,dst=...[,readonly] (container schedulers)
        debug: turn on torch's distributed debug flags
    """
    if arm not in ARMS:
        raise ValueError(f"train: --arm must be one of {', '.join(ARMS)}, got {arm!r}")
    args = ["--data-dir", data_dir, "--out", out, "--arm", arm, *_option("--store", store),
            *_option("--steps", steps), *script_args]
    return _launch("train", TRAIN_MODULE, args, name=name, j=j, image=image, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
                   max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
                   debug=debug, max_restarts=max_restarts)


def evaluate(
    *script_args: str,
    data_dir: Optional[str] = None,
    store: Optional[str] = None,
    checkpoint: Optional[str] = None,
    out: Optional[str] = None,
    name: str = "bahe/evaluate",
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """Evaluate trained models on every rank (``python -m bahe.launchers.evaluate``).

    Only the options that are set are forwarded; everything else goes after ``--``.

    Args:
        script_args: further evaluator flags, after ``--`` (passed unchanged)
        data_dir: folder of the sample .parquet files, as the ranks see it (forwarded as --data-dir)
        store: behaviour store root (forwarded as --store)
        checkpoint: checkpoint or training output folder to evaluate (forwarded as --checkpoint)
        out: output folder for the metrics (forwarded as --out)
        name: job name, ``{experiment}/{run}``
        j: {nnodes}x{nproc_per_node}: nodes times ranks per node (one rank per GPU on GPU nodes)
        image: container image (Docker, Kubernetes) or directory (Slurm); local_cwd ignores it
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: environment of every rank, K=V,K2=V2; overrides OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false
        max_retries: scheduler retries of the whole job
        rdzv_port: rendezvous port on the first node (multi-node only)
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        mounts: volumes, type=bind|volume,src=...,dst=...[,readonly] (container schedulers)
        debug: turn on torch's distributed debug flags
    """
    args = [*_option("--data-dir", data_dir), *_option("--store", store), *_option("--checkpoint", checkpoint),
            *_option("--out", out), *script_args]
    return _launch("evaluate", EVALUATE_MODULE, args, name=name, j=j, image=image, cpu=cpu, gpu=gpu, memMB=memMB,
                   env=env, max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
                   debug=debug)


def predict(
    *script_args: str,
    run: str,
    data: List[str],
    out: str,
    which: str = "best",
    data_dir: Optional[str] = None,
    quiet: bool = True,
    name: str = "bahe/predict",
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """Score sample files with a trained run on every rank (``python -m bahe.launchers.predict``).

    Each rank scores a contiguous share of the rows; rank 0 joins the shares into ``out`` (its folder must
    be one every rank sees).

    Args:
        script_args: further bahe-predict flags, after ``--`` (e.g. ``-- --batch-size 1024 --store /stores/today``)
        run: the training run folder (bahe-train --out), as the ranks see it
        data: sample .parquet files to score, comma-separated, in output order
        out: the score file (.parquet) to write, in an existing folder shared by the ranks
        which: best (the checkpoint the run selected on valid) or latest
        data_dir: the run's training data folder (its train.parquet: feature schema, dense statistics)
        quiet: hide the progress bar (logs of remote jobs stay readable)
        name: job name, ``{experiment}/{run}``
        j: {nnodes}x{nproc_per_node}: nodes times ranks per node (one rank per GPU on GPU nodes)
        image: container image (Docker, Kubernetes) or directory (Slurm); local_cwd ignores it
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: environment of every rank, K=V,K2=V2; overrides OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false
        max_retries: scheduler retries of the whole job
        rdzv_port: rendezvous port on the first node (multi-node only)
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        mounts: volumes, type=bind|volume,src=...,dst=...[,readonly] (container schedulers)
        debug: turn on torch's distributed debug flags
    """
    if which not in ("best", "latest"):
        raise ValueError(f"predict: --which must be best or latest, got {which!r}")
    if not data:
        raise ValueError("predict: --data needs at least one .parquet file")
    # --run-dir, not --run: torchrun reads every --option on its command line and refuses --run as ambiguous
    # with its own --run-path (bahe-predict accepts --run on one process only).
    args = ["--run-dir", run, "--data", *data, "--out", out, "--which", which, *_option("--data-dir", data_dir),
            *(["--quiet"] if quiet else []), *script_args]
    return _launch("predict", PREDICT_MODULE, args, name=name, j=j, image=image, cpu=cpu, gpu=gpu, memMB=memMB,
                   env=env, max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
                   debug=debug)

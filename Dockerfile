# The image of the gpu-node and k8s profiles of torchx.yaml: this repository on the CUDA builds of its locked versions,
# installed by tools/install_env.sh, the same step `make env` runs (its `gpu` kind). From the repository root:
#
#   docker build -t ghcr.io/your-org/bahe-torchrec:latest .
#   docker push ghcr.io/your-org/bahe-torchrec:latest
#
# Another registry or tag: build with that name and set `image:` of both profiles to it (docs/launching.md).
# Every version is requirements/gpu.lock's (pyproject.toml states ranges; the install step installs the lock
# with `pip install -c`). TORCH_INDEX_URL picks the CUDA build of the locked torch and
# fbgemm-gpu releases: match it to the base image and the nodes' driver (tests/test_container.py checks 12.8).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG LOCK=requirements/gpu.lock
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

LABEL org.opencontainers.image.title="bahe-torchrec" \
      org.opencontainers.image.description="BAHE on TorchRec: LLM-enhanced CTR prediction (CUDA, NCCL)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.ref.name="ghcr.io/your-org/bahe-torchrec:latest"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# Ubuntu 24.04's Python 3.12 (pyproject allows 3.10-3.12); the apt versions follow the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/bahe
COPY . .
RUN LOCK="${LOCK}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash tools/install_env.sh gpu /opt/bahe/.venv

# torchrun, bahe-train, ... of the venv first: TorchX's components start `torchrun` from PATH.
ENV PATH=/opt/bahe/.venv/bin:${PATH}

# The training image that a Prefect Docker or Kubernetes work pool runs (params.yaml:
# schedule.image). Build it at the project root and push it to the hospital's registry:
#   docker build -t registry.example.org/fracture:$(git rev-parse --short HEAD) .
# On a GPU node, run its containers with the NVIDIA container toolkit (--gpus all); torch's
# CUDA libraries come with its wheel.
# The base is pinned to the Python release constraints.txt was resolved and tested on (3.11.7) and
# to Debian 12 (bookworm): python:3.11 alone moved to each new patch release and the next Debian.
# The tag is still rebuilt upstream with security fixes; a site that wants the same base on every
# build pins its digest as well, read once from the registry:
#   docker buildx imagetools inspect python:3.11.7-slim-bookworm    # the "Digest:" line
# and written FROM python:3.11.7-slim-bookworm@sha256:<that digest>. Move both the tag and
# constraints.txt when the pinned set is resolved again.
FROM python:3.11.7-slim-bookworm

# make runs the install step; git is DVC's repository and the runs' record of the code version.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fracture
COPY . .

# The README's install step, unchanged: `make main` and `make test` both start with it. It
# creates .venv from the pinned constraints.txt (and the report assets pinned in
# fracture/docs_assets.lock.json), so the image trains with the libraries CI tested.
RUN make venv

ENV PATH=/opt/fracture/.venv/bin:$PATH \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1

# A work pool's worker starts its flow runs itself; run by hand, the image retrains once.
CMD ["python", "-m", "flows.retrain"]

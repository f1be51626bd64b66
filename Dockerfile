# syntax=docker/dockerfile:1
#
# DPP image: one image for every role; the command picks the role.
#   API         gunicorn --bind=0.0.0.0:8000 "dpp.api:create_app()"   (the default)
#   worker      celery --app=dpp worker --concurrency=1
#   beat        celery --app=dpp beat
#   Flower      celery --app=dpp flower --port=5555    (FLOWER_BASIC_AUTH from the environment)
#   migrations  sh -c "alembic upgrade head && exec dpp plans seed"
# Settings come only from the environment (dpp/config.py). docker-compose.yml and the
# Helm chart (helm/dpp) run it read-only as UID 10001 with /tmp writable.
#
#   docker build -t dpp:dev .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: compilers and headers live only here -------------------------------------
FROM ${PYTHON_IMAGE} AS build

# Every dependency ships a manylinux wheel for amd64 today; these let pip build one
# that does not (pycurl on another platform, say) without them reaching the final image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libcurl4-openssl-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml setup.cfg README.md celeryconfig.py ./
COPY dpp ./dpp
COPY tasks ./tasks
# A regular (non-editable) install: dpp, tasks and celeryconfig land in the venv's
# site-packages, compiled to bytecode, so /src is not needed at run time.
RUN pip install --no-cache-dir . \
 && python -m compileall -q /opt/venv

# --- runtime: Python, the venv, and what the commands read from the working directory -
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 dpp \
 && useradd --system --uid 10001 --gid dpp --home-dir /home/dpp --create-home --shell /usr/sbin/nologin dpp \
 && mkdir -p /run/prometheus \
 && chown dpp:dpp /run/prometheus

COPY --from=build /opt/venv /opt/venv

# Root-owned and read-only to the service user. alembic.ini and migrations/ are read
# from here by `alembic upgrade head`; scripts/devstack.py is docker-compose's aws-init.
WORKDIR /app
COPY alembic.ini gunicorn.conf.py ./
COPY migrations ./migrations
COPY scripts/devstack.py ./scripts/devstack.py

USER 10001:10001
EXPOSE 8000 5555
CMD ["gunicorn", "--bind=0.0.0.0:8000", "--workers=2", "--access-logfile=-", "dpp.api:create_app()"]

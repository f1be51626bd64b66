# DPP image: one image for every role (API, worker, beat, Flower, migrations);
# the command picks the role. Settings come only from the environment (dpp/config.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --user-group dpp
WORKDIR /app

# The code stays root-owned (read-only to the service user). It runs from /app,
# where alembic.ini, migrations/ and celeryconfig.py are.
COPY . .
RUN pip install . && rm -rf build ./*.egg-info

USER dpp
EXPOSE 8000
CMD ["gunicorn", "-b", "0.0.0.0:8000", "-w", "2", "--access-logfile", "-", "dpp.api:create_app()"]

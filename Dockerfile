# One image for every dercmd service; pick the service with the command, e.g.
#   docker run dercmd:local python -m dercmd.dispatch
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DERCMD_BIND_HOST=0.0.0.0

RUN groupadd --system --gid 10001 dercmd \
 && useradd --system --uid 10001 --gid dercmd --home-dir /app --shell /usr/sbin/nologin dercmd

# Build from a throw-away copy of the source; only the installed package stays.
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY libs ./libs
COPY services ./services
RUN pip install --no-cache-dir . \
 && rm -rf /src

# Run-time files: the fleet file (DERCMD_FLEET_FILE defaults to deploy/fleet.example.yaml,
# relative to the working directory) and var/ for the default SQLite ledger.
WORKDIR /app
COPY deploy ./deploy
RUN mkdir -p /app/var && chown dercmd:dercmd /app/var

USER dercmd

EXPOSE 8080 8081 8082 8083 8090

CMD ["python", "-m", "dercmd.intake"]

# syntax=docker/dockerfile:1
# tether server image: `docker build -t tether .` then
#   docker run -p 50051:50051 -v tether-data:/data -v ./secrets:/secrets:ro \
#     -e TETHER_AUTH_TOKENS=/secrets/tokens tether
#   (it listens on 0.0.0.0, so it needs credentials: README "Security")
#   docker run tether migrate --db postgresql://...       (any `tether` subcommand)

# --- builder: wheels for tether-client, tether-server and every dependency ------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY client/ client/
COPY server/ server/
# Both local projects in one resolve, so tether-server's pin on tether-client==0.1.0 is
# satisfied by ./client rather than looked up on an index.
RUN pip wheel --wheel-dir /wheels ./client ./server

# --- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/tether \
    PATH=/opt/tether/bin:$PATH

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/tether \
    && /opt/tether/bin/pip install --no-index --find-links=/wheels tether-server \
    && groupadd --system --gid 10001 tether \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin tether \
    && mkdir -p /data \
    && chown tether:tether /data

ENV TETHER_DB=sqlite:////data/tether.db \
    TETHER_LISTEN=0.0.0.0:50051

WORKDIR /data
VOLUME ["/data"]
# Numeric, so orchestrators can verify runAsNonRoot.
USER 10001:10001
EXPOSE 50051

# grpc.health.v1 check of the whole server (service ""), on the port TETHER_LISTEN names.
# With TLS on (TETHER_TLS_CERT) the check cannot know which name or client certificate to
# present: it only checks that the port accepts connections.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, socket, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; port = int(os.environ.get('TETHER_LISTEN', '0.0.0.0:50051').rsplit(':', 1)[1]); tls = bool(os.environ.get('TETHER_TLS_CERT')); socket.create_connection(('127.0.0.1', port), timeout=3).close() if tls else None; sys.exit(0 if tls or g.HealthStub(grpc.insecure_channel(f'127.0.0.1:{port}')).Check(h.HealthCheckRequest(service=''), timeout=3).status == h.HealthCheckResponse.SERVING else 1)"]

# Exec form: tether is PID 1 and receives SIGTERM from `docker stop` to drain and exit.
ENTRYPOINT ["tether"]
CMD ["serve"]

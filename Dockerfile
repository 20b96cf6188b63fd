# mqttsvc as a container: `twistd -n mqttsvc`, configured by environment.
#
#   docker build -t mqttsvc .
#   docker run -d --name mqttsvc -p 8780:8780 \
#       -e MQTTSVC_DB='host=db.example user=mqttsvc dbname=mqttsvc' -e MQTTSVC_MIGRATE=1 \
#       -v "$PWD/tokens:/run/secrets/mqttsvc_tokens:ro" mqttsvc
#
# Environment (the same as `twistd mqttsvc --help` lists):
#   MQTTSVC_DB              libpq connection string (required)
#   MQTTSVC_MIGRATE=1       apply pending schema migrations at start
#   MQTTSVC_RPC             JSON-RPC listener; default here tcp:8780:interface=0.0.0.0
#   MQTTSVC_RPC_TOKEN_FILE  token file; default here /run/secrets/mqttsvc_tokens
#   MQTTSVC_SECRET_KEY_FILE key that encrypts broker passwords at rest (mount it
#                           like the tokens, e.g. /run/secrets/mqttsvc_key;
#                           make one with `mqttsvc generate-key`)
#   every other option has its MQTTSVC_* variable (see README.md)
#
# The token file is REQUIRED with the default listener: mqttsvc refuses to
# serve JSON-RPC on a non-loopback interface without one, and stops at start
# with "configuration error: rpc-token-file: ...".  Mount a file of
# 'NAME TOKEN' lines (tokens of 16 characters or more) at
# /run/secrets/mqttsvc_tokens, or mount it elsewhere and set
# MQTTSVC_RPC_TOKEN_FILE.  mqttsvc also refuses a token file that every user
# may read, and it runs as uid 10001 here, so on the host:
#     chown 10001 tokens && chmod 600 tokens
# (Docker Swarm/Compose secrets: mode 0400, uid "10001".)  To run without
# tokens, listen on loopback only: MQTTSVC_RPC=tcp:8780:interface=127.0.0.1
# and MQTTSVC_RPC_TOKEN_FILE= (empty).
#
# The HEALTHCHECK asks http://127.0.0.1:8780/healthz: if you move the
# listener to another port, override the health check too.

# --- build: a wheel of mqttsvc, installed with its dependencies in /opt/venv --
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY mqttsvc ./mqttsvc
COPY twisted ./twisted
# A plain (not editable) install puts twisted/plugins/mqttsvc_plugin.py into
# site-packages/twisted/plugins, where twistd finds it.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install /wheels/mqttsvc-*.whl

# --- runtime -------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 mqttsvc \
    && useradd --system --uid 10001 --gid mqttsvc --home-dir /var/lib/mqttsvc \
        --create-home --shell /usr/sbin/nologin mqttsvc

COPY --from=builder /opt/venv /opt/venv

# Write twistd's plugin cache now, as root: at run time the non-root user
# cannot update it.  Then prove that twistd sees the plugin.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd --help | grep -q '^ *mqttsvc '

# See the top of this file: the 0.0.0.0 listener needs the token file.
ENV MQTTSVC_RPC=tcp:8780:interface=0.0.0.0 \
    MQTTSVC_RPC_TOKEN_FILE=/run/secrets/mqttsvc_tokens

# Numeric, so that Kubernetes' runAsNonRoot can verify it: 10001 is mqttsvc.
USER 10001:10001
WORKDIR /var/lib/mqttsvc

EXPOSE 8780

# No curl in the slim image; any error or non-2xx answer exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8780/healthz', timeout=4)"]

# twistd handles SIGTERM (docker stop) by stopping the services cleanly; with
# -n it logs to standard output.
CMD ["twistd", "-n", "--pidfile=", "mqttsvc"]

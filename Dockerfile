# credproxy as a container, usually a sidecar next to an agent (see docker-compose.example.yml).
#
# Nothing secret is baked in: mount a folder at /data holding config.json and the credentials file
# it names (auth.json, mode 0600). The folder must be writable by uid 10001: credproxy keeps its
# state file (auth.state.json) and lock files beside auth.json and writes refreshed OAuth tokens back.
#
#   docker build -t credproxy .
#   docker run --rm -v "$PWD/credproxy-data:/data" -p 127.0.0.1:8787:8787 credproxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir './[redis]' \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin credproxy

USER 10001
VOLUME ["/data"]
EXPOSE 8787

# python:slim has no curl; the check reads the listen port from the same config file.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "proxy.admin.healthcheck", "--config", "/data/config.json"]

# Inside a container the proxy must listen beyond loopback for the agent to reach it. Publish the
# port on the host's 127.0.0.1 only, and see README "Security model" for client tokens.
ENTRYPOINT ["credproxy"]
CMD ["serve", "--config", "/data/config.json", "--host", "0.0.0.0"]

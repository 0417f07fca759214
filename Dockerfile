# The broker as a container: `make image` (BASE=... for another Python 3.11 base).
#
# The wheels come from the build context (build/wheels, made by `make image` with the host's
# pip), so the build itself needs no network: it works on a box with no registry to pull from,
# from a base made of Debian's packages (.ci/docker-setup). The base must have Python 3.11
# (python:3.11-slim, or Debian bookworm's python3 with python3-venv).
ARG BASE=python:3.11-slim
FROM ${BASE}

# Hardening in the spirit of deploy/mgpumanager.service: a user of its own that owns nothing
# (the code belongs to root, read-only to it), no shell profile, nothing setuid; run it with
# --read-only --cap-drop ALL --security-opt no-new-privileges (deploy/compose.yaml does).
# The passwd line is written directly: minimal bases have no useradd.
RUN echo "mgpumanager:x:10001:10001:mgpumanager:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
 && echo "mgpumanager:x:10001:" >> /etc/group \
 && mkdir -p /etc/mgpumanager && chmod 0755 /etc/mgpumanager

COPY build/wheels /tmp/wheels
RUN python3 -m venv /opt/mgpumanager \
 && /opt/mgpumanager/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
      --disable-pip-version-check --quiet mgpumanager \
 && rm -rf /tmp/wheels \
 && { find / -xdev -perm /6000 -type f -exec chmod a-s {} + 2>/dev/null || true; }

ENV PATH=/opt/mgpumanager/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MGPU_HEALTH_URL=http://127.0.0.1:8770/healthz
USER 10001:10001
WORKDIR /tmp
# The registry is mounted at /etc/mgpumanager/consumers.yaml (read-only); `listen` in it must
# be 0.0.0.0:8770 (with auth.token) for other containers to reach it, or 127.0.0.1 with
# --network host.
EXPOSE 8770
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MGPU_HEALTH_URL'], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["mgpumanager", "serve", "--config", "/etc/mgpumanager/consumers.yaml"]

# trainhealth images for docker-compose.yml (and for your own deployments):
#   docker build --target sidecar -t trainhealth .    the sidecar (`trainhealth serve`)
#   docker build --target trainer -t trainhealth-trainer .    + CPU torch, the reference trainer
FROM python:3.11-slim AS sidecar
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /data --create-home trainhealth
USER trainhealth
WORKDIR /data
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]
ENTRYPOINT ["trainhealth"]
# Loopback unless told otherwise: to reach it from outside its container, give it a token too, e.g.
#   docker run -e TRAINHEALTH_TOKEN=$(openssl rand -hex 32) -p 9464:9464 trainhealth serve --host 0.0.0.0 ...
# (binding beyond loopback without a token works, with a warning at start).
CMD ["serve", "--port", "9464", "--db", "/data/trainhealth.db"]

FROM sidecar AS trainer
USER root
# CPU wheels: the default index would pull several GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.1" \
    && pip install "/src[trainer]"
USER trainhealth
HEALTHCHECK NONE
ENTRYPOINT []
CMD ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "trainhealth.trainer"]

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
CMD ["serve", "--host", "0.0.0.0", "--port", "9464", "--db", "/data/trainhealth.db"]

FROM sidecar AS trainer
USER root
# CPU wheels: the default index would pull several GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.1" \
    && pip install "/src[trainer]"
USER trainhealth
HEALTHCHECK NONE
ENTRYPOINT []
CMD ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "trainhealth.trainer"]

# The pggeolearn CLI against an external PostGIS (see docker-compose.yml).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gdal-bin && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir "/src[plot]"
WORKDIR /work
ENTRYPOINT []

# The one image every Deployment in deploy/k8s runs (the command picks the service).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir . && useradd --uid 10001 vrs
USER vrs
EXPOSE 8000

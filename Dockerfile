# The one image every Deployment in deploy/k8s runs (the command picks the service).

# The dashboard's chart library, from the lock file; only its one built file reaches the image.
FROM node:20-slim AS web
WORKDIR /web
COPY services/stats/web/package.json services/stats/web/package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM python:3.11-slim
WORKDIR /app
# The font registry embeds in the PDF 接種証明書 (VRS_REGISTRY_CERTIFICATE_FONT).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-ipaexfont && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir . && useradd --uid 10001 vrs
COPY --from=web /web/node_modules/echarts/dist/echarts.min.js /app/web/echarts.min.js
ENV VRS_STATS_ECHARTS_PATH=/app/web/echarts.min.js
USER vrs
EXPOSE 8000

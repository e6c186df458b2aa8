# sms-compat in a container. Not built or run in this repository's CI (no docker there).
#   docker build -t sms-compat .
#   docker run -d --name sms-compat -p 8080:8080 -v sms-compat-data:/data \
#     -v "$PWD/config.yaml:/etc/sms-compat/config.yaml:ro" \
#     -e CLIENT_KEY=... -e TCS_TOKEN=... sms-compat
# In config.yaml set server.host: 0.0.0.0 and store.path: /data/sms-compat.sqlite3.
# `docker kill -s HUP sms-compat` re-reads the config; /healthz and /readyz answer JSON.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY compat_server ./compat_server
COPY providers ./providers
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin sms-compat \
    && install -d -o sms-compat -g sms-compat /data /etc/sms-compat
COPY --from=build /install /usr/local
USER sms-compat
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# exec form: the server is PID 1 and receives SIGHUP (reload) and SIGINT (stop) itself
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["sms-compat"]
CMD ["serve", "--config", "/etc/sms-compat/config.yaml", "--log-format", "json"]

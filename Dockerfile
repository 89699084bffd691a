# chatserver: one daemon, WebSocket at /ws on port 8080.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY config/constraints.txt ./config/constraints.txt
COPY chatserver ./chatserver
COPY twisted ./twisted
# The exact versions the test suite passed with.
RUN python -m venv /opt/chatserver \
 && /opt/chatserver/bin/pip install --no-cache-dir -c config/constraints.txt . \
 && /opt/chatserver/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

FROM python:3.11-slim
RUN useradd --system --home-dir /var/lib/chatserver --create-home --uid 10001 chatserver
COPY --from=build /opt/chatserver /opt/chatserver
COPY config/chatserver.toml /etc/chatserver/chatserver.toml
USER chatserver
WORKDIR /var/lib/chatserver
ENV PATH=/opt/chatserver/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 8080
CMD ["twistd", "-n", "--pidfile=", "chatserver", "--config", "/etc/chatserver/chatserver.toml"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"

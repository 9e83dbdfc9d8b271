# iopfd in a container: the daemon serving the host's iommufd fault queues.
#
#   docker build -t iopfd .
#   docker run -d --name iopfd \
#     --device /dev/iommu --device /dev/vfio/devices/vfio0 \
#     --cap-drop ALL --security-opt no-new-privileges \
#     -v /run/iopfd:/run/iopfd -v /etc/iopfd:/etc/iopfd:ro \
#     -p 127.0.0.1:9769:9769 iopfd
#
# No capability is needed: iopfd only opens /dev/iommu (for broker) and the devices passed in, and
# serves fault fds handed over on /run/iopfd/control.sock (shared with the VMMs through the volume).
# See docs/operations.md.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY iopfd ./iopfd
# The wheel carries the units, example configs and man page (pyproject.toml force-include).
COPY systemd ./systemd
COPY config ./config
COPY man/iopfd.8 ./man/iopfd.8
# Wheels for iopfd and every dependency, so the final stage installs offline and without a compiler.
RUN pip wheel --no-cache-dir --wheel-dir /dist .

FROM python:3.11-slim
COPY --from=build /dist /tmp/dist
RUN pip install --no-cache-dir --no-index --find-links /tmp/dist iopfd==0.1.0 && rm -rf /tmp/dist \
    && mkdir -p /etc/iopfd /run/iopfd
COPY config/iopfd-host.toml /etc/iopfd/iopfd.toml
# Metrics listen on all interfaces inside the container; publish the port to the host's loopback.
ENV IOPFD_METRICS_ADDRESS=0.0.0.0:9769 PYTHONUNBUFFERED=1
EXPOSE 9769
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9769/metrics', timeout=4)"]
ENTRYPOINT ["iopfd"]
CMD ["run", "--config", "/etc/iopfd/iopfd.toml"]

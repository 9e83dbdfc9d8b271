# Small image with iopfd installed. Run it against the host's iommufd:
#   docker build -t iopfd . && docker run --rm --device /dev/iommu iopfd probe
# The daemon entry point (`iopfd run`) replaces probe once the engine lands.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY iopfd ./iopfd
# Wheels for iopfd and all its dependencies, so the final stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /dist .

FROM python:3.11-slim
COPY --from=build /dist /tmp/dist
RUN pip install --no-cache-dir --no-index --find-links /tmp/dist iopfd && rm -rf /tmp/dist
ENTRYPOINT ["iopfd"]
CMD ["probe"]

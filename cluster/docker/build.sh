#!/usr/bin/env bash
# Build (and with PUSH=1 push) the GPU image every KubeRay manifest uses. Run from anywhere:
#   REGISTRY=ghcr.io/acme cluster/docker/build.sh            # -> ghcr.io/acme/qwen-tts-fleet:0.1.0-cuda
#   REGISTRY=ghcr.io/acme PUSH=1 cluster/docker/build.sh
# Then set that image in cluster/kuberay/*.yaml and cluster/cron/*.yaml (they say `qwen-tts-fleet:0.1.0-cuda`, a
# local name; README.md "Run on a GPU cluster" has the sed). TAG (default 0.1.0-cuda), RAY_IMAGE and TORCH_INDEX
# override the tag and the Dockerfile's build args.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tag="${TAG:-0.1.0-cuda}"
image="${REGISTRY:+$REGISTRY/}qwen-tts-fleet:$tag"
DOCKER_BUILDKIT=1 docker build -f "$root/cluster/docker/Dockerfile" -t "$image" \
  ${RAY_IMAGE:+--build-arg RAY_IMAGE="$RAY_IMAGE"} ${TORCH_INDEX:+--build-arg TORCH_INDEX="$TORCH_INDEX"} "$root"
echo "built $image"
if [ "${PUSH:-0}" = 1 ]; then
  docker push "$image"
  echo "pushed $image"
fi

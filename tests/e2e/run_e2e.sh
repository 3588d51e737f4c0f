#!/usr/bin/env bash
# End-to-end tests: drive a real `kiln serve` over gRPC from Python, as a
# user's client would.
#
#   tests/e2e/run_e2e.sh [--suite=e2e|deploy] KILN_BINARY MODEL_DIR [pytest args...]
#
# Sets up what the tests need, then runs pytest on tests/<suite> (default
# e2e; `deploy` is tests/deploy, the deployment files of deploy/ and the
# Dockerfile) and exits with its status (pytest's "no tests collected", 5,
# counts as a failure):
#   - a venv at <repo>/.cache/e2e-venv (made with `python3 -m venv`, or
#     $KILN_E2E_PYTHON), reused while tests/e2e/requirements.txt is unchanged;
#   - Debian's `prometheus` package (promtool + prometheus) when either tool is
#     missing: apt-get update + install, via sudo only when not root;
#   - deploy suite only: Debian's `nginx` (the scale-out proxy) and, when no
#     kubectl is on PATH, Debian's `kubernetes-client` (kubectl kustomize).
# The kiln_pb2 stubs are generated from proto/kiln/v1/kiln.proto at run time
# by conftest.py (nothing generated is committed).
# Needs PyPI and Debian's archive only on the first run; nothing else.
set -euo pipefail

suite=e2e
if [[ "${1:-}" == --suite=* ]]; then
  suite="${1#--suite=}"
  shift
fi
if [[ $# -lt 2 || ( "${suite}" != e2e && "${suite}" != deploy ) ]]; then
  echo "usage: $0 [--suite=e2e|deploy] KILN_BINARY MODEL_DIR [pytest args...]" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
tests="${repo}/tests/${suite}"

# Paths may be given relative to the caller's directory or to the repo root.
resolve() {
  local p="$1"
  if [[ -e "${p}" ]]; then
    (cd "$(dirname "${p}")" && echo "$(pwd)/$(basename "${p}")")
  elif [[ -e "${repo}/${p}" ]]; then
    (cd "$(dirname "${repo}/${p}")" && echo "$(pwd)/$(basename "${p}")")
  else
    echo "run_e2e.sh: not found: ${p}" >&2
    return 1
  fi
}
kiln_binary="$(resolve "$1")"
model_dir="$(resolve "$2")"
shift 2
if [[ ! -x "${kiln_binary}" ]]; then
  echo "run_e2e.sh: not executable: ${kiln_binary}" >&2
  exit 2
fi
if [[ ! -f "${model_dir}/config.json" ]]; then
  echo "run_e2e.sh: no config.json in model folder ${model_dir} (run scripts/fetch_model.sh?)" >&2
  exit 2
fi

log() { echo "run_e2e.sh: $*" >&2; }

# --- Python venv -------------------------------------------------------------
venv="${repo}/.cache/e2e-venv"
req="${here}/requirements.txt"
stamp="${venv}/.kiln-e2e-requirements"
python="${KILN_E2E_PYTHON:-python3}"
venv_ok() {
  [[ -x "${venv}/bin/python" ]] && cmp -s "${req}" "${stamp}" &&
    "${venv}/bin/python" -c 'import grpc, grpc_tools, grpc_health, grpc_reflection, pytest' \
      >/dev/null 2>&1
}
if ! venv_ok; then
  log "setting up ${venv} from ${req}"
  rm -rf "${venv}"
  mkdir -p "$(dirname "${venv}")"
  if ! "${python}" -m venv "${venv}"; then
    # Debian's python3 needs python3-venv for ensurepip.
    log "python3 -m venv failed; installing Debian's python3-venv"
    rm -rf "${venv}"
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then sudo=(sudo -n); fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    "${python}" -m venv "${venv}"
  fi
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    -r "${req}"
  "${venv}/bin/python" -m pip check
  cp "${req}" "${stamp}"
fi

# --- Debian packages -----------------------------------------------------------
apt_install() {
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then sudo=(sudo -n); fi
  log "installing Debian's $*"
  "${sudo[@]}" apt-get update -qq
  # The packages' services (a system nginx on :80, prometheus on :9090) must
  # not start: a policy-rc.d that denies every start, for the install only
  # (honoured by invoke-rc.d and deb-systemd-invoke alike).
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e "${policy}" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "${policy}" >/dev/null
    "${sudo[@]}" chmod 755 "${policy}"
    own_policy=1
  fi
  local rc=0
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || rc=$?
  if ((own_policy)); then "${sudo[@]}" rm -f "${policy}"; fi
  return "${rc}"
}
# promtool for `check metrics` and rule tests, prometheus for a real scrape.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  apt_install prometheus
fi
# deploy suite: nginx for the scale-out test, kubectl for kustomize.
if [[ "${suite}" == deploy ]]; then
  if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
    apt_install nginx
  fi
  if ! command -v kubectl >/dev/null 2>&1; then
    apt_install kubernetes-client
  fi
fi

# --- pytest ------------------------------------------------------------------
export KILN_BINARY="${kiln_binary}"
export KILN_MODEL_DIR="${model_dir}"
export PYTHONDONTWRITEBYTECODE=1
# hadolint and kubernetes-validate come with the venv.
export PATH="${venv}/bin:${PATH}"
# tests/deploy imports the e2e helpers (kiln_e2e) and fixtures.
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
# gRPC and urllib must not send loopback traffic through a proxy.
export no_proxy="127.0.0.1,localhost${no_proxy:+,${no_proxy}}"
export NO_PROXY="${no_proxy}"

cd "${repo}"
set +e
"${venv}/bin/python" -m pytest -c "${here}/pytest.ini" --rootdir "${tests}" "${tests}" "$@"
rc=$?
set -e
if [[ ${rc} -eq 5 ]]; then
  log "pytest collected no tests: failing"
  exit 1
fi
exit ${rc}

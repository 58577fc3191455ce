#!/usr/bin/env bash
# Prepare this checkout to run the local stack and the tests, on Debian 12, as root.
#
#   1. Debian packages: redis-server redis-sentinel nginx-light openssl prometheus prometheus-alertmanager
#      chromium (plus a JRE, Maven and python3-venv when missing); the services their postinst
#      would auto-start are kept off, because the stack runs its own instances on its own
#      ports. chromium is the browser the browser tests drive (tests/browser, through
#      Playwright with executable_path=/usr/bin/chromium; Playwright's own browser download
#      is never used).
#   2. .venv in the checkout with the project installed editable, with test and dev extras,
#      and the repository-only local-stack tools (devtools/pyproject.toml: crm-events-stack,
#      crm-events-producer), also editable; they are not part of the crm-events wheel; and the
#      Python client (clients/python: crm-events-client, crm-events-tail), editable.
#   3. The Kafka broker jars from Maven Central (deploy/kafka/kafka-pom.xml) into
#      <run dir>/kafka/libs.
#   4. helm and kubeconform (Go module proxy, pinned versions; needs Go >= 1.26) and offline
#      kubeconform schemas for the chart's tests into <run dir>/chart-tools.
#   5. The JavaScript client's development dependencies (eventsource, TypeScript) with
#      `npm ci` into clients/js/node_modules (Node.js and npm from Debian when missing).
#
# Idempotent: each step keeps a stamp and is skipped while its input is unchanged, so a second
# run takes a second or two. Settings: CRM_EVENTS_RUN_DIR (default <checkout>/run),
# CRM_EVENTS_PYTHON (default python3, must be >= 3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${CRM_EVENTS_RUN_DIR:-$ROOT/run}"
PYTHON="${CRM_EVENTS_PYTHON:-python3}"
VENV="$ROOT/.venv"
POM="$ROOT/deploy/kafka/kafka-pom.xml"
KAFKA_LIBS="$RUN_DIR/kafka/libs"
APT_PACKAGES=(redis-server redis-sentinel nginx-light haproxy openssl prometheus prometheus-alertmanager chromium firefox-esr wrk)
# Services those packages ship; none of them may keep running in the background.
DISTRO_SERVICES=(redis-server redis-sentinel nginx haproxy prometheus prometheus-alertmanager prometheus-node-exporter)
# The stack's default ports (see devtools/stack.py).
STACK_PORTS=(9092 19093 6379 9020 9011 9012 9010 9443 9090 9093)

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

sha() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root for: $*"
    fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# --- 1. Debian packages -----------------------------------------------------------------------

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
command -v java >/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v sha256sum >/dev/null || missing+=(coreutils)

if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    # Debian's policy-rc.d hook: exit 101 tells the packages' postinst not to start services.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        own_policy=1
    fi
    cleanup_policy() { if ((own_policy)); then as_root rm -f "$policy"; fi; }
    trap cleanup_policy EXIT
    lists_fresh=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -1 2>/dev/null | head -n1)
    if [[ -z $lists_fresh ]]; then
        say "apt-get update (package lists are missing or older than a day)..."
        as_root apt-get update -qq
    fi
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
        say "retrying after apt-get update..."
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    cleanup_policy
    trap - EXIT
fi

# Stop the distribution's own instances if something started them anyway (an install made
# before this script, a systemd host's boot).
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    for svc in "${DISTRO_SERVICES[@]}"; do
        if systemctl is-enabled --quiet "$svc" 2>/dev/null || systemctl is-active --quiet "$svc" 2>/dev/null; then
            say "disabling the distribution's $svc service"
            as_root systemctl disable --now --quiet "$svc" 2>/dev/null || true
        fi
    done
else
    for svc in "${DISTRO_SERVICES[@]}"; do
        if [[ -x /etc/init.d/$svc ]] && /etc/init.d/"$svc" status >/dev/null 2>&1; then
            say "stopping the distribution's $svc service"
            as_root /etc/init.d/"$svc" stop >/dev/null 2>&1 || true
        fi
    done
fi

# Anything still listening on a stack port is reported, not killed: it may be the stack itself
# (make up) or someone else's process.
if command -v ss >/dev/null; then
    for port in "${STACK_PORTS[@]}"; do
        users=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n1 || true)
        [[ -n $users ]] || continue
        ours=0
        for pid in $(grep -o 'pid=[0-9]*' <<<"$users" | cut -d= -f2); do
            if grep -qs "\"pid\": $pid," "$RUN_DIR"/pids/*.pid; then ours=1; fi
        done
        if ((!ours)); then
            say "note: port $port is already in use by $users; the stack cannot use it while it is"
        fi
    done
fi

# --- 2. Python virtualenv ---------------------------------------------------------------------

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.11 (set CRM_EVENTS_PYTHON)"
py_id=$("$PYTHON" -c 'import sys; print(sys.version)')
venv_stamp="$VENV/.crm-events-install"
want_venv=$(printf '%s\n%s\n' "$py_id" "$(sha "$ROOT/pyproject.toml" "$ROOT/devtools/pyproject.toml" "$ROOT/clients/python/pyproject.toml")")

if [[ ! -x $VENV/bin/python ]]; then
    if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        say "installing python3-venv (ensurepip is missing)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    say "creating .venv"
    "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f $venv_stamp || $(cat "$venv_stamp") != "$want_venv" ]]; then
    say "installing the project into .venv (new or a pyproject.toml changed: up to ~1 min)..."
    # pip's build backend is chatty even with -q; its output is kept for when it fails.
    pip_log="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip \
           && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test,dev,bench]" \
           && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT/devtools" \
           && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT/clients/python"; \
         } >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        die "pip install failed (full log: $pip_log)"
    fi
    printf '%s' "$want_venv" > "$venv_stamp"
else
    say ".venv is up to date"
fi

# --- 3. Kafka broker jars ---------------------------------------------------------------------

libs_stamp="$KAFKA_LIBS/.crm-events-pom.sha256"
want_libs=$(sha "$POM")
if [[ ! -f $libs_stamp || $(cat "$libs_stamp") != "$want_libs" ]]; then
    say "fetching Kafka jars from Maven Central (first time: ~1 min)..."
    mkdir -p "$RUN_DIR/kafka"
    tmp="$(mktemp -d "$RUN_DIR/kafka/libs.tmp.XXXXXX")"
    # Maven's own cache (~/.m2) makes later copies quick; the copy goes to a fresh directory
    # and replaces libs/ whole, so jars of an older version never linger on the classpath.
    # Maven's console library writes colour resets even in batch mode; strip them.
    if ! mvn -q -B -Dstyle.color=never -f "$POM" \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1 \
        | sed -e 's/\x1b\[[0-9;]*m//g' -e '/^[[:space:]]*$/d'; then
        rm -rf "$tmp"
        die "fetching the Kafka jars failed (see Maven's output above)"
    fi
    printf '%s' "$want_libs" > "$tmp/.crm-events-pom.sha256"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
    say "Kafka jars ready: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS"
else
    say "Kafka jars are up to date"
fi

# --- 4. Kubernetes chart tools ----------------------------------------------------------------
# helm and kubeconform for the chart's tests (tests/chart), built by the Go toolchain from the Go
# module proxy at pinned versions into <run dir>/chart-tools/bin, and offline JSON schemas for
# kubeconform in <run dir>/chart-tools/schemas: kubeconform's default schemas live on GitHub,
# which the tests must not need. Their sources are Go modules too: Kubernetes' OpenAPI document
# (k8s.io/kubernetes, api/openapi-spec/swagger.json, in an 18 MB module zip) and the CRDs of the kinds the chart renders besides
# Kubernetes' own (prometheus-operator's and KEDA's modules, 4 and 3 MB), converted by
# deploy/helm/kubeconform_schemas.py. Needs Go >= 1.26 (both tools' go.mod); without it the
# chart tests report themselves skipped.

CHART_TOOLS="$RUN_DIR/chart-tools"
HELM_MODULE=helm.sh/helm/v3/cmd/helm@v3.22.0
# helm's default Kubernetes version, as its own release build sets it (its Makefile: the minor
# of k8s.io/client-go in its go.mod, v0.37 for v3.22.0); without it helm assumes 1.20.
HELM_K8S_MINOR=37
KUBECONFORM_MODULE=github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0
K8S_SCHEMA_MODULE=k8s.io/kubernetes@v1.34.3
PROMETHEUS_OPERATOR_MODULE=github.com/prometheus-operator/prometheus-operator@v0.85.0
KEDA_MODULE=github.com/kedacore/keda/v2@v2.21.0
SCHEMA_TOOL="$ROOT/deploy/helm/kubeconform_schemas.py"
# Two parts, each stamped with what it was made from and replaced whole when that changes.
bin_stamp="$CHART_TOOLS/bin/.crm-events-chart-tools"
want_bin=$(printf '%s\n' "$HELM_MODULE" "$HELM_K8S_MINOR" "$KUBECONFORM_MODULE")
schemas_stamp="$CHART_TOOLS/schemas/.crm-events-chart-tools"
want_schemas=$(printf '%s\n' "$K8S_SCHEMA_MODULE" "$PROMETHEUS_OPERATOR_MODULE" "$KEDA_MODULE" \
    "$(sha "$SCHEMA_TOOL")")

stamped() { [[ -f $1 && $(cat "$1") == "$2" ]]; }

go_ok() {
    command -v go >/dev/null || return 1
    local v major rest minor
    v=$(go env GOVERSION 2>/dev/null) || return 1
    v=${v#go}
    major=${v%%.*}
    rest=${v#*.}
    minor=${rest%%.*}
    [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
    ((major > 1 || (major == 1 && minor >= 26)))
}

# The Dir a `go mod download -json` reports (the unpacked module).
module_dir() { "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'; }

# Builds one part into a fresh directory beside it ($1: bin or schemas, $2: its stamp text,
# then the command, which gets the directory as its last argument); replaces it on success.
make_part() {
    local part=$1 want=$2 dir
    shift 2
    mkdir -p "$CHART_TOOLS"
    dir="$(mktemp -d "$CHART_TOOLS/$part.tmp.XXXXXX")"
    if ! "$@" "$dir"; then
        rm -rf "$dir"
        die "building the chart tools' $part failed (see the output above)"
    fi
    printf '%s' "$want" > "$dir/.crm-events-chart-tools"
    rm -rf "${CHART_TOOLS:?}/$part"
    mv "$dir" "$CHART_TOOLS/$part"
}

# GOTOOLCHAIN=local: never fetch another Go. Run outside any module (cd), so that no go.mod
# applies. The modules go to Go's own module cache: a later build on this machine (a new run
# directory, another version) downloads nothing again.
build_tools() (
    cd "$1"
    export GOTOOLCHAIN=local GOFLAGS= GOBIN="$1"
    go install -trimpath -ldflags "-s -w \
        -X helm.sh/helm/v3/internal/version.version=${HELM_MODULE#*@} \
        -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR" "$HELM_MODULE"
    go install -trimpath -ldflags "-s -w -X main.version=${KUBECONFORM_MODULE#*@}" \
        "$KUBECONFORM_MODULE"
)

# The schema sources go to a module cache of their own, removed afterwards (the Kubernetes
# module unpacks to ~110 MB; -modcacherw lets it be removed); only the schemas are kept.
build_schemas() (
    local modcache k8s operator keda crds
    modcache="$(mktemp -d "$CHART_TOOLS/modcache.tmp.XXXXXX")"
    trap 'rm -rf "$modcache"' EXIT
    cd "$modcache"
    export GOTOOLCHAIN=local GOFLAGS=-modcacherw GOMODCACHE="$modcache"
    k8s=$(go mod download -json "$K8S_SCHEMA_MODULE" | module_dir)
    operator=$(go mod download -json "$PROMETHEUS_OPERATOR_MODULE" | module_dir)
    keda=$(go mod download -json "$KEDA_MODULE" | module_dir)
    crds="$operator/example/prometheus-operator-crd/monitoring.coreos.com"
    "$VENV/bin/python" "$SCHEMA_TOOL" --out "$1" \
        --kubernetes-version "${K8S_SCHEMA_MODULE#*@}" \
        --swagger "$k8s/api/openapi-spec/swagger.json" \
        --crd "${crds}_servicemonitors.yaml" --crd "${crds}_prometheusrules.yaml" \
        --crd "${crds}_prometheuses.yaml" \
        --crd "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
        --crd "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml"
)

if stamped "$bin_stamp" "$want_bin" && stamped "$schemas_stamp" "$want_schemas"; then
    say "chart tools are up to date"
elif ! go_ok; then
    say "note: Go >= 1.26 is not installed: the chart tests (tests/chart) cannot run"
else
    if ! stamped "$bin_stamp" "$want_bin"; then
        say "building helm and kubeconform from the Go module proxy (first time: a few minutes)..."
        make_part bin "$want_bin" build_tools
    fi
    if ! stamped "$schemas_stamp" "$want_schemas"; then
        say "making kubeconform's schemas (Kubernetes ${K8S_SCHEMA_MODULE#*@}, and the chart's CRDs)..."
        make_part schemas "$want_schemas" build_schemas
    fi
    say "chart tools ready: helm $("$CHART_TOOLS/bin/helm" version --short)," \
        "kubeconform $("$CHART_TOOLS/bin/kubeconform" -v)"
fi

# --- 5. The JavaScript client's development dependencies ----------------------------------------
# clients/js itself has no runtime dependency. Its tests and examples/tail.mjs need the
# `eventsource` npm package (Node has no EventSource), its tests TypeScript (to check the
# declarations), pinned by package-lock.json and installed with `npm ci` into
# clients/js/node_modules, only when the lock file changed. Node.js and npm come from Debian
# when missing (Debian 12 ships Node 18, older than the Node >= 20 that `eventsource` declares:
# npm warns, and a newer Node from elsewhere is the safer choice).
JS_CLIENT="$ROOT/clients/js"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "installing Node.js and npm (the JavaScript client's tests)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi
js_stamp="$JS_CLIENT/node_modules/.crm-events-lock.sha256"
want_js=$(sha "$JS_CLIENT/package-lock.json")
if [[ ! -f $js_stamp || $(cat "$js_stamp") != "$want_js" ]]; then
    say "installing the JavaScript client's test dependencies (npm ci)..."
    npm_log="$RUN_DIR/npm-ci.log"
    mkdir -p "$RUN_DIR"
    if ! (cd "$JS_CLIENT" && npm ci --no-audit --no-fund) >"$npm_log" 2>&1; then
        tail -n 40 "$npm_log" >&2
        die "npm ci failed in clients/js (full log: $npm_log)"
    fi
    printf '%s' "$want_js" > "$js_stamp"
else
    say "the JavaScript client's dependencies are up to date"
fi

say "done"

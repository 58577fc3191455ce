#!/usr/bin/env bash
# Refresh the vendored Grafana JSON schemas in monitoring/grafana/schemas/ from upstream.
#
#   scripts/refresh-grafana-schemas.sh [REF]      (or: make grafana-schemas [GRAFANA_SDK_REF=REF])
#
# Upstream is the grafana/grafana-foundation-sdk repository, directory jsonschema/ (Apache-2.0).
# Neither of its packages carries these files: the PyPI wheel and the npm package ship only
# generated code, so the repository is the source. REF is a tag, branch or full commit id;
# without it, the newest release tag (vX.Y.Z). GRAFANA_SDK_REPO overrides the repository URL
# (a local clone of it works too, for an offline refresh; NOTICE still names the upstream).
#
# It copies the files listed in SCHEMAS unmodified, the upstream LICENSE, and rewrites NOTICE
# with the ref and commit they came from. Review the diff, then run the dashboard tests
# (tests/monitoring/test_grafana_dashboard.py): a newer schema may reject what the old one
# accepted. The tests never run this script: they read only the vendored copy.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/monitoring/grafana/schemas"
REPO="${GRAFANA_SDK_REPO:-https://github.com/grafana/grafana-foundation-sdk.git}"
# The whole dashboard, the Prometheus query (panel targets), and one file per panel kind. A
# dashboard panel of a kind not listed here fails the tests: add its name and rerun.
SCHEMAS=(dashboard prometheus bargauge gauge heatmap stat table text timeseries)

say() { printf '[grafana-schemas] %s\n' "$*"; }
die() { printf '[grafana-schemas] error: %s\n' "$*" >&2; exit 1; }

ref="${1:-}"
if [[ -z $ref ]]; then
    ref=$(git ls-remote --tags --refs --sort=-v:refname "$REPO" 'v[0-9]*' \
        | sed -n 's|.*refs/tags/||p' | grep -E '^v[0-9]+\.[0-9]+\.[0-9]+$' | head -n1) \
        || true
    [[ -n $ref ]] || die "no release tag found in $REPO; pass a ref"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say "fetching $ref from $REPO"
git -C "$work" init -q repo
git -C "$work/repo" fetch -q --depth 1 "$REPO" "$ref" || die "cannot fetch $ref from $REPO"
commit=$(git -C "$work/repo" rev-parse FETCH_HEAD)
date=$(git -C "$work/repo" show -s --format=%cs FETCH_HEAD)

mkdir -p "$work/out"
for name in "${SCHEMAS[@]}"; do
    file="$name.jsonschema.json"
    git -C "$work/repo" show "FETCH_HEAD:jsonschema/$file" >"$work/out/$file" \
        || die "$ref has no jsonschema/$file"
    python3 -m json.tool "$work/out/$file" >/dev/null || die "$file is not valid JSON"
done
git -C "$work/repo" show FETCH_HEAD:LICENSE >"$work/out/LICENSE"

cat >"$work/out/NOTICE" <<NOTICE
Grafana JSON schemas, vendored from grafana-foundation-sdk
Copyright Grafana Labs, licensed under the Apache License, Version 2.0 (see LICENSE).

Source:  https://github.com/grafana/grafana-foundation-sdk, directory jsonschema/
Ref:     $ref
Commit:  $commit ($date)
Files:   ${SCHEMAS[*]/%/.jsonschema.json}

The files are copied unmodified by scripts/refresh-grafana-schemas.sh, which wrote this notice.
NOTICE

cp "$work/out/"* "$DEST/"
say "vendored ${#SCHEMAS[@]} schemas from $ref ($commit) into monitoring/grafana/schemas/"

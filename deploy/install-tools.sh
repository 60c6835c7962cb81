#!/usr/bin/env bash
# Installs the manifest tools the tests use (tests/integration/deploy) into .cache/bin, from the Go module
# proxy: kustomize renders deploy/k8s overlays, kubeconform validates them against deploy/schemas.
# Uses the machine's Go; without one, fetches the Go toolchain itself from the proxy (as `go` does for
# GOTOOLCHAIN) into .cache/go. Idempotent: pinned versions already installed are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
KUSTOMIZE=v5.8.2      # needs Go >= 1.26 (GOTOOLCHAIN=auto fetches it when the local Go is older)
KUBECONFORM=v0.7.0
GO_FALLBACK=1.26.8
export GOBIN="$PWD/.cache/bin" GOTOOLCHAIN=auto GOFLAGS=-mod=mod
mkdir -p "$GOBIN"

go=go
if ! command -v go >/dev/null; then
  go="$PWD/.cache/go/bin/go"
  if [ ! -x "$go" ]; then
    echo "no Go on this machine: fetching go$GO_FALLBACK from proxy.golang.org" >&2
    python3 - "$GO_FALLBACK" <<'PY'
import io, sys, urllib.request, zipfile, pathlib, os
version = sys.argv[1]
url = f"https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go{version}.linux-amd64.zip"
data = urllib.request.urlopen(url, timeout=300).read()
prefix = f"golang.org/toolchain@v0.0.1-go{version}.linux-amd64/"
target = pathlib.Path(".cache/go")
with zipfile.ZipFile(io.BytesIO(data)) as archive:
    for info in archive.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        path = target / info.filename[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(archive.read(info))
        if "/bin/" in info.filename or "/pkg/tool/" in info.filename:
            os.chmod(path, 0o755)
PY
  fi
fi

installed() { [ -x "$GOBIN/$1" ] && grep -q "$2" "$GOBIN/.$1.version" 2>/dev/null; }
if ! installed kustomize "$KUSTOMIZE"; then
  "$go" install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE" && echo "$KUSTOMIZE" > "$GOBIN/.kustomize.version"
fi
if ! installed kubeconform "$KUBECONFORM"; then
  "$go" install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM" && echo "$KUBECONFORM" > "$GOBIN/.kubeconform.version"
fi
"$GOBIN/kustomize" version >/dev/null && "$GOBIN/kubeconform" -v >/dev/null
echo "kustomize $KUSTOMIZE and kubeconform $KUBECONFORM in $GOBIN"

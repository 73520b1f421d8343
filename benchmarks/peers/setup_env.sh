#!/usr/bin/env bash
# Create (or complete) the peer benchmark environment benchmarks/.venv-peers: CPU torch 2.13.0,
# learn2learn 0.2.0, higher 0.2.1, TorchOpt 0.7.3, and fewshot itself, the way
# shared/notes/peer-libraries.md says they install on this machine.
#
# Idempotent: every step checks first and skips what is already there. Safe to re-run.
#
# Environment variables:
#   PEERS_VENV   where to put the environment (default: benchmarks/.venv-peers)
#   PYTHON       interpreter to build it from (default: python3; the torch wheel is for CPython 3.11)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${PEERS_VENV:-$REPO/benchmarks/.venv-peers}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$HERE/constraints.txt"
BUILD="$VENV/build"   # learn2learn's sdist is unpacked and compiled here (inside the venv folder)

TORCH_VERSION=2.13.0
HIGHER_VERSION=0.2.1
TORCHOPT_VERSION=0.7.3
L2L_VERSION=0.2.0

start=$(date +%s)
say() { printf '[setup_env] %s\n' "$*"; }
run() { say "+ $*"; "$@"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    run "$PYTHON" -m venv "$VENV"
else
    say "venv exists: $VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")

# installed_version NAME -> prints the installed distribution version, or nothing
installed_version() {
    "$PY" -I - "$1" <<'PYEOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PYEOF
}

# need NAME VERSION_PREFIX: succeeds if NAME is installed at a version starting with VERSION_PREFIX
need() {
    local have
    have="$(installed_version "$1")"
    if [[ -n "$have" && "$have" == "$2"* ]]; then
        say "ok: $1 $have already installed"
        return 1
    fi
    say "installing $1 $2 (found: ${have:-none})"
    return 0
}

# 1. torch (local CPU wheel, found through pip's configured find-links) and the small pure-Python
#    dependencies the peers import at run time (the peers themselves go in with --no-deps):
#    optree and graphviz for TorchOpt (torchopt/__init__ imports torchopt.visual -> graphviz),
#    requests and tqdm for learn2learn (learn2learn/__init__ -> learn2learn.data.utils).
if need torch "$TORCH_VERSION"; then run "${PIP[@]}" "torch==$TORCH_VERSION"; fi
for pkg in numpy optree graphviz requests tqdm; do
    if need "$pkg" ""; then run "${PIP[@]}" "$pkg"; fi
done

# 2. higher: pure Python, works as is.
if need higher "$HIGHER_VERSION"; then run "${PIP[@]}" --no-deps "higher==$HIGHER_VERSION"; fi

# 3. TorchOpt: its C++ extension does not load against torch 2.13 and it falls back to pure Python.
if need torchopt "$TORCHOPT_VERSION"; then run "${PIP[@]}" --no-deps "torchopt==$TORCHOPT_VERSION"; fi

# 4. learn2learn: the sdist's generated C files include a header Python 3.11 removed, so regenerate
#    them with a current Cython and build without isolation (Cython and setuptools from this venv).
if need learn2learn "$L2L_VERSION"; then
    for pkg in cython setuptools wheel; do
        if need "$pkg" ""; then run "${PIP[@]}" "$pkg"; fi
    done
    mkdir -p "$BUILD"
    sdist="$BUILD/learn2learn-$L2L_VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        # --no-build-isolation: with --no-binary :all: an isolated metadata build would compile
        # setuptools itself from source (minutes); this venv's setuptools does the same job.
        run "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
            --no-build-isolation -d "$BUILD" "learn2learn==$L2L_VERSION"
    fi
    src="$BUILD/learn2learn-$L2L_VERSION"
    rm -rf "$src"
    run tar -xzf "$sdist" -C "$BUILD"
    shopt -s nullglob
    pyx=("$src"/learn2learn/data/*.pyx)
    other=()
    for f in $(cd "$src" && find learn2learn -name '*.pyx' ! -path 'learn2learn/data/*'); do other+=("$src/$f"); done
    shopt -u nullglob
    if (( ${#other[@]} )); then say "note: further .pyx files found, regenerating them too: ${other[*]}"; fi
    run "$VENV/bin/cython" -3 "${pyx[@]}" "${other[@]}"
    run "${PIP[@]}" --no-deps --no-build-isolation "$src"
fi

# 5. fewshot itself: editable install without dependencies when it has a pyproject.toml, then
#    whichever of its declared runtime dependencies are missing (torch stays pinned by the
#    constraints file); without a pyproject.toml, put the repository on the venv's import path
#    with a .pth file (the venv's own PYTHONPATH entry).
site="$("$PY" -I -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
pth="$site/fewshot-repo.pth"
if [[ -f "$REPO/pyproject.toml" ]]; then
    if [[ -f "$pth" ]]; then run rm -f "$pth"; fi
    if [[ -n "$(installed_version fewshot)" ]]; then
        say "ok: fewshot already installed ($(installed_version fewshot))"
    else
        run "${PIP[@]}" --no-deps -e "$REPO"
    fi
    mapfile -t missing < <("$PY" -I - "$REPO/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
from importlib import metadata
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f).get("project", {}).get("dependencies", [])
for dep in deps:
    name = re.match(r"[A-Za-z0-9_.\-]+", dep).group(0)
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(dep)
PYEOF
)
    if (( ${#missing[@]} )); then
        say "installing fewshot's missing dependencies: ${missing[*]}"
        run "${PIP[@]}" "${missing[@]}"
    else
        say "ok: fewshot's dependencies present"
    fi
else
    say "no $REPO/pyproject.toml: adding $REPO to the venv's path via $pth"
    echo "$REPO" > "$pth"
fi

# 6. Report what the environment has, importing each peer the way the benchmark does
#    (peer_step.import_learn2learn stubs learn2learn.vision and learn2learn.gym: their torchvision
#    and gym cannot load here, and MAML needs neither).
"$PY" -I - "$HERE" <<'PYEOF'
import sys, warnings
from importlib import metadata
sys.path.insert(0, sys.argv[1])
from peer_step import import_learn2learn
import_learn2learn()
import torch
print(f"[setup_env] python {sys.version.split()[0]}, torch {torch.__version__}")
for name in ("higher", "torchopt", "learn2learn"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        __import__(name)
    print(f"[setup_env] import {name} {metadata.version(name)}: ok"
          + (f" ({len(caught)} warnings on import)" if caught else ""))
try:
    import fewshot
    print(f"[setup_env] import fewshot: ok ({fewshot.__file__})")
except Exception as exc:  # the core package is being written concurrently
    print(f"[setup_env] import fewshot: not importable yet ({type(exc).__name__}: {exc})")
PYEOF
say "done in $(( $(date +%s) - start )) s: $VENV"

#!/usr/bin/env bash
# Installs what mirenfs needs on a fresh Debian/Ubuntu machine: the system
# packages (FUSE, the tools the tests drive) and a virtual environment with
# the package and its test tools. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# etcd-server: the tests start their own etcd (127.0.0.1, free ports) for the fleet catalogue.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-venv rsync zstd e2fsprogs xfsprogs btrfs-progs attr util-linux tar coreutils restic borgbackup etcd-server)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing system packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi

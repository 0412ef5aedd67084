#!/usr/bin/env bash
# Make sure Fashion-MNIST is on disk (the default data set), installing Debian's package when apt is usable.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
[ -f "$dir/train-images-idx3-ubyte.gz" ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
    if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
        echo "Fashion-MNIST missing: installing Debian package dataset-fashion-mnist" >&2
        $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
        [ -f "$dir/train-images-idx3-ubyte.gz" ] && exit 0
    fi
fi
echo "error: Fashion-MNIST not found in $dir; run 'apt-get install -y dataset-fashion-mnist' as root," \
     "or pass --set data.root=DIR pointing at the four idx .gz files" >&2
exit 1

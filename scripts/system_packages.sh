#!/usr/bin/env bash
# System packages the test suite needs beyond pip: a virtual X server and Qt's xcb libraries, for the
# napari plugin's tests (Qt cannot create napari's OpenGL canvas on its "offscreen" platform).
# Installs them with apt-get (Debian/Ubuntu) when missing; does nothing when they are present.
set -euo pipefail
PACKAGES="xvfb libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1 libfontconfig1 libdbus-1-3"
missing() {
    command -v Xvfb >/dev/null 2>&1 || return 0
    local libs
    libs="$(ldconfig -p)"
    for lib in libxcb-icccm.so.4 libxcb-image.so.0 libxcb-keysyms.so.1 libxcb-render-util.so.0 libxcb-xinerama.so.0 libxkbcommon-x11.so.0 libGL.so.1 libEGL.so.1; do
        [[ "$libs" == *"$lib"* ]] || return 0
    done
    return 1
}
if ! missing; then
    echo "system packages for the napari tests: present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: the napari tests need Xvfb and Qt's xcb libraries ($PACKAGES); install them with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends $PACKAGES || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends $PACKAGES; }

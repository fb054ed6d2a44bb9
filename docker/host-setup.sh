#!/bin/sh
# What the image tests (tests/test_image.py, `make image-test`) need on the host, on Debian or Ubuntu as root:
# Debian's Docker engine (docker.io), debootstrap (the CPU base is made from Debian's packages) and docker-compose
# (the compose file's MLflow service), dicom3tools (dciodvfy), then a running Docker daemon. Also orthanc and dcmtk for the
# tests of `seg3d serve`. Installs only what is missing, quietly.
#   sh docker/host-setup.sh
set -eu
cd "$(dirname "$0")/.."
need=""
[ -x /usr/sbin/dockerd ] || command -v dockerd > /dev/null 2>&1 || need="$need docker.io"
command -v debootstrap > /dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need="$need debootstrap"
command -v docker-compose > /dev/null 2>&1 || need="$need docker-compose"
# dciodvfy validates the DICOM SEG and RTSTRUCT that infer writes (tests/pipeline/test_rtstruct.py and others).
command -v dciodvfy > /dev/null 2>&1 || need="$need dicom3tools"
# The tests of `seg3d serve` run Orthanc as a PACS on loopback, on free ports and with their own configuration
# (tests/pipeline/_orthanc.py): a system Orthanc service that the package starts on 4242/8042 is no matter.
[ -x /usr/sbin/Orthanc ] || command -v Orthanc > /dev/null 2>&1 || need="$need orthanc"
# dcmtk's storescu, storescp and echoscu: a second DICOM implementation to send and receive with.
command -v storescu > /dev/null 2>&1 || need="$need dcmtk"
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null 2>&1; then
        echo "docker/host-setup.sh: missing$need; install them (apt-get install$need) as root" >&2
        exit 1
    fi
    log=/tmp/seg3d-host-setup-apt.log
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need; } > "$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "docker/host-setup.sh: apt-get install$need failed (log: $log)" >&2
        exit 1
    fi
    echo "docker/host-setup.sh: installed$need"
fi
# The client's own Python module starts dockerd (standard library only: no virtual environment needed yet).
python3 docker/cpu_image.py daemon

#!/bin/sh
# The root file system of seg3d's CPU test base: Debian bookworm (minbase) with Debian's own Python 3.11, the
# Python of the torch 2.13.0 CPU wheel that `make test` installs, and the libraries OpenCV's cv2 loads (libGL, GLib,
# libxcb: rt-utils draws RTSTRUCT contours with it), which docker/Dockerfile would otherwise fetch with apt. Made
# from Debian's packages alone, since Docker Hub (and so any ready-made base image) may be out of reach;
# docker/cpu_image.py imports the folder as an image.
#   sh docker/cpu-base/rootfs.sh DIR            (as root; DEBIAN_MIRROR overrides the mirror)
set -eu
dir=$1
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,libgl1,libglib2.0-0,libxcb1 \
    bookworm "$dir" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# apt's downloaded packages and lists and the documentation: nothing in the image reads them (about 110 MB).
rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/*

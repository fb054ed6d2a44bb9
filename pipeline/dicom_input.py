"""DICOM input as hospitals send it: a folder holding several series, a zip of a series, slices in any order.

`seg3d infer` reads exactly one series per case (pipeline/dicomio.py). This module turns what a PACS export or a
colleague's e-mail gives into that: the series of a folder are listed (UID, modality, description, slice count) and
one is picked by `--series UID`, or the input is refused with the list, so the user can choose; a zip is extracted
into a private temporary folder first, member by member, refusing what no export makes (entries that climb out of
the archive, absolute names, links, encryption) and what would fill the disk (a declared total over
`MAX_ZIP_BYTES` or over the free space: a "zip bomb"), before a byte is written. The series picked from a folder of
several is read through a private folder of links to its files, so every later step (the read, the DICOM SEG and
RTSTRUCT references) sees one series. Slices in any order need nothing here: GDCM sorts them along their normal.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import Seg3dError, one_line, shown
from pipeline.limits import MAX_VOXELS
from pipeline.names import check_case_id

# A zip may expand to at most this: the largest series seg3d reads (MAX_VOXELS 16-bit voxels) and 1 GiB of headers.
MAX_ZIP_BYTES = MAX_VOXELS * 2 + 2**30
MAX_ZIP_MEMBERS = 100_000  # files: a 2000-slice series is 2000; a hundred thousand is no export of one study
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a folder, as GDCM groups the files (by SeriesInstanceUID, sorted along the slice normal)."""

    uid: str
    modality: str
    description: str
    files: tuple[str, ...]

    def describe(self) -> str:
        what = ", ".join(x for x in (self.modality, shown(self.description, 40) if self.description else "") if x)
        return f"{self.uid or '(blank UID)'} ({what + ', ' if what else ''}{len(self.files)} files)"


def list_series(folder: Path) -> list[SeriesInfo]:
    """The DICOM series in `folder` (not its subfolders), with the modality and description of their first file."""
    import pydicom

    from pipeline.dicomio import quiet_itk

    with quiet_itk():
        import SimpleITK as sitk

        reader = sitk.ImageSeriesReader()
        try:
            uids = reader.GetGDCMSeriesIDs(str(folder))
            grouped = [(uid, tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))) for uid in uids]
        except RuntimeError as err:
            raise Seg3dError(f"cannot list DICOM series in {folder}: {one_line(err, limit=1000)}") from None
    found = []
    for uid, files in grouped:
        try:
            first = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["Modality", "SeriesDescription"])
            modality, description = str(first.get("Modality", "") or ""), str(first.get("SeriesDescription", "") or "")
        except Exception:  # an unreadable header is the reader's to report, if this series is the one read
            modality, description = "", ""
        found.append(SeriesInfo(uid=uid, modality=modality, description=" ".join(description.split()), files=files))
    return found


def listed(series: list[SeriesInfo], limit: int = 8) -> str:
    """The series for a one-line message: the first `limit` of them, and how many more."""
    text = "; ".join(s.describe() for s in series[:limit])
    return text + (f"; and {len(series) - limit} more" if len(series) > limit else "")


def pick_series(
    folder: Path, uid: str | None, *, staging: Path | None, shown_as: Path | None = None, case: str | None = None
) -> Path:
    """The folder to read as one series: `folder` itself when it holds one series (the one asked for, if `uid` is
    given), else a folder under `staging` linking to the files of series `uid`. Refused with the list of series when
    there are several and none is asked for, or the one asked for is not there. `shown_as` names the input (a zip)."""
    where = shown_as or folder
    series = list_series(folder)
    if not series and uid is None and shown_as is None:
        return folder  # the reader refuses it when the case runs, naming the case, as for any unreadable input
    if not series:
        raise Seg3dError(
            f"no DICOM series in {where}; give a NIfTI file, a DICOM series folder or a zip of a series", case=case
        )
    if uid is None:
        if len(series) > 1:
            raise Seg3dError(
                f"{len(series)} DICOM series in {where}: {listed(series)}; pick one with --series UID, or give "
                + ("a zip" if shown_as is not None else "a folder")
                + " of exactly one series",
                case=case,
            )
        return folder
    chosen = next((s for s in series if s.uid == uid), None)
    if chosen is None:
        raise Seg3dError(f"--series {shown(uid, 70)} is not in {where}, which holds {listed(series)}", case=case)
    if len(series) == 1:
        return folder
    if staging is None:
        raise ValueError("a series picked from a folder of several is read through a staging folder")
    picked = staging / f"series-{len(list(staging.iterdir()))}"
    picked.mkdir()
    for i, name in enumerate(chosen.files):
        # Links, not copies: the files read are the originals, and their identity (pipeline.imageio.file_identity,
        # which follows links) is the originals', so a slice replaced during the run is still noticed.
        os.symlink(os.path.abspath(name), picked / f"{i:06d}.dcm")
    return picked


def extract_zip(archive: Path, *, staging: Path | None) -> Path:
    """The files of `archive` in a new folder under `staging`, flat (entries numbered in archive order: names in
    the archive never become paths here). Everything is checked before a byte is written."""
    if staging is None:
        raise ValueError("a zip is extracted into a staging folder")
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            _check_members(archive, members, free=shutil.disk_usage(staging).free)
            folder = staging / f"zip-{len(list(staging.iterdir()))}"
            folder.mkdir()
            for i, member in enumerate(members):
                _extract_member(zf, member, folder / f"{i:06d}", archive)
    except zipfile.BadZipFile as err:
        reason = one_line(err, 120)
        raise Seg3dError(f"{archive} is not a readable zip ({reason}); give a zip of one DICOM series") from None
    except (NotImplementedError, RuntimeError) as err:  # an unsupported compression method, an encrypted member
        raise Seg3dError(f"cannot extract {archive}: {one_line(err, 120)}; zip the series again with deflate") from None
    return folder


def _check_members(archive: Path, members: list[zipfile.ZipInfo], *, free: int) -> None:
    if not members:
        raise Seg3dError(f"zip {archive} is empty; give a zip of one DICOM series")
    if len(members) > MAX_ZIP_MEMBERS:
        raise Seg3dError(f"zip {archive} holds {len(members):,} files, over {MAX_ZIP_MEMBERS:,}; give one series")
    for m in members:
        parts = PurePosixPath(m.filename.replace("\\", "/")).parts
        if m.filename.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
            raise Seg3dError(
                f"zip {archive} has an entry named {shown(m.filename)} that points outside the archive (an absolute "
                "path or '..'); no PACS export makes one: refused, nothing was extracted"
            )
        if stat.S_ISLNK(m.external_attr >> 16):
            raise Seg3dError(f"zip {archive} has a link {shown(m.filename)}; a series is files: refused")
        if m.flag_bits & 0x1:
            raise Seg3dError(f"zip {archive} is encrypted ({shown(m.filename)}); give an unencrypted zip")
    total = sum(m.file_size for m in members)
    limit = min(MAX_ZIP_BYTES, free)
    if total > limit:
        room = f"the {free:,} bytes free for temporary files" if free < MAX_ZIP_BYTES else f"{MAX_ZIP_BYTES:,} bytes"
        raise Seg3dError(
            f"zip {archive} would expand to {total:,} bytes, over {room} (a zip bomb, or more than one series): "
            "nothing was extracted; give a zip of one series"
        )


def _extract_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    """Copy one member, never more bytes than it declares (zipfile checks the length and CRC at its end)."""
    written = 0
    with zf.open(member) as src, open(target, "wb") as dst:
        while block := src.read(_CHUNK):
            written += len(block)
            if written > member.file_size:
                raise Seg3dError(f"zip {archive}: {shown(member.filename)} holds more than it declares; refused")
            dst.write(block)


def is_zip_input(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".zip"


def dicom_input(source: Path, *, series: str | None, staging: Path | None) -> tuple[str, Path]:
    """(case id, folder of one series) for a DICOM folder or a zip of one; the case id is the folder's name or the
    zip's name without .zip."""
    if is_zip_input(source):
        case = check_case_id(source.name[: -len(".zip")], where=f"zip {source}")
        folder = extract_zip(source, staging=staging)
        return case, pick_series(folder, series, staging=staging, shown_as=source, case=case)
    case = check_case_id(source.name, where=f"DICOM folder {source}")
    return case, pick_series(source, series, staging=staging, case=case)

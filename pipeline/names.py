"""Names that come from data and end up in file names, metric names and DICOM labels: case ids and class names.

They are data from files nobody checked (a CSV's case column, a dataset.json's labels, a file name), so each must be
a single safe name: no path separator, no control character, no leading dot or dash, a bounded length. A name that is
not is refused with one line naming it (shortened) and where it came from; nothing maps it to something else
silently.
"""

from __future__ import annotations

import re

from pipeline.errors import Seg3dError, shown

# A case id names the case's output files, and a class name its metrics and DICOM segments: both are data from files
# nobody checked, so they must be a single safe name (no separator, no control character, no leading dot or dash),
# never a path.
_SAFE_NAME = re.compile(r"\w[\w.+ -]*")
MAX_CASE_ID, MAX_CLASS_NAME = 128, 64


def is_safe_name(name: object, limit: int) -> bool:
    """A single safe name of at most `limit` characters: no separator, no control character, no leading dot or dash."""
    return isinstance(name, str) and 0 < len(name) <= limit and _SAFE_NAME.fullmatch(name) is not None


def check_case_id(case: object, where: str) -> str:
    """`case` if it is a safe case id, else a Seg3dError naming it (shortened), `where` it came from and the fix."""
    rule = (
        f"letters, digits, '_', '.', '-', '+' and spaces, starting with a letter, digit or '_', at most {MAX_CASE_ID}"
        " characters"
    )
    if not isinstance(case, str) or not case:
        raise Seg3dError(
            f"empty case id for {where} (a file named only '_0000.nii.gz' or '.nii.gz'?); case ids name the output "
            "files: rename the file, or list the cases in a CSV case,image,label with ids of " + rule
        )
    if not is_safe_name(case, MAX_CASE_ID):
        raise Seg3dError(
            f"case id {shown(case)} for {where} is not a safe name for output files; use {rule} (rename the file, "
            "or list the cases in a CSV case,image,label with such ids)"
        )
    return case


def check_class_name(name: object, where: str) -> str:
    if not is_safe_name(name, MAX_CLASS_NAME):
        raise Seg3dError(
            f"class name {shown(str(name))} in {where} is not a safe name; class names become metric names and DICOM"
            f" segment labels: use letters, digits, '_', '.', '-', '+' and spaces, at most {MAX_CLASS_NAME} characters"
        )
    return name

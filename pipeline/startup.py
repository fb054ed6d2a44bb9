"""What a command imports before its first useful line: kept to what it uses.

`import monai` walks every MONAI sub-package (monai/__init__.py's load_submodules), and pkgutil imports each
package it walks, excluded ones included: monai.handlers imports MLflow, monai.utils imports matplotlib.pyplot and
pandas, monai.metrics scikit-learn. seg3d uses none of those MONAI integrations (its tracking is its own, its figures
are pipeline.plots'), so a command that merely runs a network should not pay for importing them: about 1.5 s of the
4.5 s that `import pipeline.infer` took (docs/benchmarks.md, "startup").

MONAI imports all four through try/except or `optional_import`, so they can be held back while MONAI itself is
imported: MONAI then records them as unavailable for its own integrations, and they import normally afterwards for
whoever needs them (pipeline.tracking for `runs:/` URIs, pipeline.plots for --overlays).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

# Imported by `import monai` only for MONAI integrations seg3d does not use. scipy.signal (and the scipy.stats it
# pulls in) is there for two transforms seg3d never runs (ultrasound confidence maps, a notch filter): about 0.5 s
# of every single-case process (docs/benchmarks.md, "startup").
MONAI_EXTRAS = ("mlflow", "matplotlib", "pandas", "sklearn", "scipy.signal", "scipy.stats")


@contextlib.contextmanager
def _held_back(modules: tuple[str, ...]) -> Iterator[None]:
    """Inside, `import m` of each module not yet imported raises ImportError (a None entry in sys.modules is
    Python's documented way to say so); after, the entries are gone and the modules import as usual."""
    held = [m for m in modules if m not in sys.modules]
    for name in held:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in held:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def import_monai_lean() -> None:
    """Import MONAI without the libraries of its integrations (MONAI_EXTRAS); nothing if MONAI is imported already."""
    if "monai" in sys.modules:
        return
    with _held_back(MONAI_EXTRAS):
        import monai  # noqa: F401

"""napari-cryomamba: open MRC tomograms in napari and segment them with CryoMamba.

The npe2 manifest (`napari.yaml`, beside this file) contributes a reader for `.mrc`,
`.map`, `.rec` and `.mrcs` files and the "CryoMamba" dock widget. Layer updates during a
job go through `cryomamba.sinks.NapariSink`, which lives in the core so that scripts can
use `sinks=["napari"]` without this plugin.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

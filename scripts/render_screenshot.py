"""Render the README / extension screenshot: the sample pair registered by the module's logic and shown in the web
app's Slicer slice views (axial, coronal, sagittal), rendered offscreen without a browser.

    python scripts/render_screenshot.py [--out Resources/Screenshots/ICONRegistration-sample.png]

Needs the app extra (pip install -e '.[app]') and EGL (Mesa); see ICONRegistrationLib/webapp/render.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ICONRegistration"))

if __name__ == "__main__":
    from ICONRegistrationLib.webapp.render import main

    arguments = sys.argv[1:]
    if "--out" not in arguments:
        arguments += ["--out", str(ROOT / "Resources" / "Screenshots" / "ICONRegistration-sample.png")]
    main(arguments)

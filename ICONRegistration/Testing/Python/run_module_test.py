"""Run ICONRegistrationTest inside 3D Slicer from a terminal; exits 0 on success, 1 on failure.

    Slicer --no-main-window --additional-module-paths ICONRegistration \
           --python-script ICONRegistration/Testing/Python/run_module_test.py

(paths relative to the repository root; in the application, the module's "Reload and Test" button runs the same
test). It registers SampleData MRBrainTumor2 to MRBrainTumor1 with the smallest model whose weights are available.
"""

import sys
import traceback

import slicer

try:
    import ICONRegistration

    ICONRegistration.ICONRegistrationTest().runTest()
except Exception:
    traceback.print_exc()
    sys.stdout.flush()
    slicer.util.exit(1)
else:
    print("ICONRegistrationTest passed")
    slicer.util.exit(0)

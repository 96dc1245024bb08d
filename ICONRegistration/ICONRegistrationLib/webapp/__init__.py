"""``iconreg app``: the browser front end (trame-slicer). Real Slicer slice views of the same MRML scene logic the
Slicer module uses, streamed to a web page. Needs the ``app`` extra (``pip install -e .[app]``)."""

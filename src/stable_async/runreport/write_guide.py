"""``python -m stable_async.runreport.write_guide RESULTS``: regenerate the packaged guide.json.

A module of its own so that ``python -m`` does not re-execute `stable_async.runreport.guide`,
which the package has already imported (runpy warns about that).
"""

from __future__ import annotations

import sys

from stable_async.runreport.guide import main

if __name__ == "__main__":
    sys.exit(main())

"""Print the lowest versions pyproject.toml allows (`name>=v` becomes `name==v`), for CI's second environment.

The declared floors are only claims until a test run installs exactly them: CI does, with this list.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
# test tools, not the library's dependencies: the floor run skips the browser tests and the notebook (marker once)
tools = ("ruff", "playwright", "nbclient", "nbformat", "ipykernel", "build", "twine", "mkdocs", "mkdocstrings")
wanted = list(project["dependencies"]) + [d for d in project["optional-dependencies"]["dev"]
                                          if not d.startswith(tools)]
pins = []
for spec in wanted:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*", spec)
    if not match:
        sys.exit(f"floors.py: expected 'name>=version' in pyproject.toml, got {spec!r}")
    pins.append(f"{match[1]}=={match[2]}")
print(" ".join(pins))

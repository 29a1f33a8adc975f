"""The dev container (Codespaces): the pieces "open it, then run the notebook" relies on.

The file is also checked against the dev container JSON schema and read by the dev container
CLI; those checks need the schema and the CLI from outside the project: docs/devcontainer.md.
"""

from __future__ import annotations

import json
import re

from conftest import ROOT

DEVCONTAINER = ROOT / ".devcontainer" / "devcontainer.json"


def _read_jsonc(text: str) -> dict:
    """devcontainer.json is JSON with // comments (on their own lines here)."""
    return json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE))


def test_devcontainer_builds_the_environment_and_uses_it_for_the_notebook():
    config = _read_jsonc(DEVCONTAINER.read_text())
    assert re.search(r"python:.*3\.11", config["image"])  # TensorFlow 2.15 + MCT 2.6.1 need 3.11
    assert config["features"]["ghcr.io/devcontainers/features/java:1"]["version"] == "17"
    command = config["postCreateCommand"]
    assert command.startswith("make venv && ")
    assert ".venv/bin/python -m ipykernel install --user --name python3" in command
    vscode = config["customizations"]["vscode"]
    assert {"ms-python.python", "ms-toolsai.jupyter"} <= set(vscode["extensions"])
    assert vscode["settings"]["python.defaultInterpreterPath"] == (
        "${workspaceFolder}/.venv/bin/python"
    )
    notebook = json.loads((ROOT / "image_classification.ipynb").read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"  # the kernel registered above
    for name in config["customizations"]["codespaces"]["openFiles"]:
        assert (ROOT / name).is_file()

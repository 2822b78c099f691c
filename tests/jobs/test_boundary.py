"""The bot side never pulls in the model stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_job_service_does_not_import_torch_or_transformers() -> None:
    code = "import sys, bot.jobs; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"

"""The shape of the code: the bot never loads the model stack; generation never knows Discord or storage."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import bot
import generation


def _modules_after_import(names: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {name}\n" for name in names) + "print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def _all_modules(package: object) -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")  # type: ignore[attr-defined]
        if not m.name.endswith("__main__")
    ]


def test_importing_the_bot_does_not_import_torch() -> None:
    loaded = _modules_after_import([m for m in _all_modules(bot)])
    assert "torch" not in loaded
    assert "transformers" not in loaded


def test_generation_api_does_not_import_torch_until_a_model_loads() -> None:
    loaded = _modules_after_import(
        ["generation", "generation.worker", "generation.audio", "generation.melody"]
    )
    assert "torch" not in loaded


def test_generation_knows_nothing_of_discord_or_storage() -> None:
    loaded = _modules_after_import(_all_modules(generation))
    assert not {"discord", "aiosqlite", "sqlite3", "bot"} & loaded

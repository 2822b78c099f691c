"""Settings read from the environment: values a user can set, and a clear message for one that is wrong."""

from __future__ import annotations

import pytest

from bot.settings import Settings, SettingsError


def test_native_kernels_are_on_unless_turned_off() -> None:
    assert Settings.from_env({}).kernels == "auto"
    assert Settings.from_env({"MUSICBOT_KERNELS": "OFF"}).kernels == "off"


def test_an_unknown_kernels_value_names_the_setting_and_the_choices() -> None:
    with pytest.raises(SettingsError, match=r"MUSICBOT_KERNELS must be one of auto, off \(got 'fast'\)"):
        Settings.from_env({"MUSICBOT_KERNELS": "fast"})

"""``musicbot run`` pointed at a local Discord emulator: the tests' own entry (argv: API base, gateway URL).

Only the tests use this; the product has no setting that points it anywhere but Discord.
"""

from __future__ import annotations

import sys

import discord
import yarl

from bot.cli import main

if __name__ == "__main__":
    api_url, gateway_url = sys.argv[1], sys.argv[2]
    if not api_url.startswith("http://127.0.0.1:") or not gateway_url.startswith("ws://127.0.0.1:"):
        raise SystemExit("run_against_emulator only talks to an emulator on 127.0.0.1")
    discord.http.Route.BASE = api_url
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    sys.exit(main(["run", *sys.argv[3:]]))

"""The bot's commands, one cog per area: music (and the buttons under a result), the queue, admin."""

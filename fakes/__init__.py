"""Real aiohttp apps imitating each backend, quirks included; used by tests/ and bench/."""

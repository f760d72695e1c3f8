"""A loopback LLM provider emulator: OpenAI, Anthropic and Gemini APIs with scripted faults.

    async with Emulator.serve() as emu:
        emu.script([Fault(status=429, headers={"retry-after": "1"})], key="k1")
        ...  # point clients at emu.url
        assert emu.calls[0].protocol == "openai"

Run it as a process with ``python -m router.emulator --port 8099``.
"""

from router.emulator._faults import EmulatorCall, Fault
from router.emulator._server import Emulator

__all__ = ["Emulator", "EmulatorCall", "Fault"]

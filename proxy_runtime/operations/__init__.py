"""Operations: doctor, call traces, the control socket and their CLI.

Uses the core, settings and the asyncio adapter; nothing below imports this package.
"""

"""The Textual terminal UI: `diptych chat`."""

from __future__ import annotations


def run_app(source=None, **kwargs) -> None:
    """Open the chat app full-screen; keyword arguments go to `DiptychApp`."""
    from .app import DiptychApp

    DiptychApp(source, **kwargs).run()

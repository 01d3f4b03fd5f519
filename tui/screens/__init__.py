"""Screens of the chat app. The main one is `ChatScreen`; `FinetuneScreen` is the other
top-level one (installed by `DiptychApp`, so that a run goes on behind the chat); the
others are dialogs over them.

A new top-level screen is pushed from `DiptychApp`, with a key binding and an entry in
`DiptychApp.get_system_commands`; a new per-chat generation option is a field of
`ChatSettings` plus one row in `settings.FIELDS` (or its own widget, as speculative
decoding's mode and draft model have).
"""

"""Screens of the chat app. The main one is `ChatScreen`; the others are dialogs over it.

New top-level screens (fine-tuning with a live loss curve) are pushed from `DiptychApp`
beside `ChatScreen`, with a key binding and an entry in `DiptychApp.get_system_commands`;
new per-chat generation options (speculative decoding) are fields of `ChatSettings` plus one
row in `settings.FIELDS`.
"""

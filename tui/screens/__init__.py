"""Screens of the chat app. The main one is `ChatScreen`; the others are dialogs over it.

New top-level screens (fine-tuning with a live loss curve) register as modes in
`DiptychApp.MODES`; new per-chat generation options (speculative decoding) are fields of
`ChatSettings` plus one row in `SettingsScreen.FIELDS`.
"""

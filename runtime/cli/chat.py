"""`diptych chat`: the Textual chat app; the command line's options are its starting
settings (sampling, speculative decoding) and what it loads (model, adapter)."""

from __future__ import annotations

from pathlib import Path

from diptych.errors import ModelFileError


def app_options(args) -> dict:
    """Keyword arguments of `DiptychApp` from the command line. Every file is checked first,
    and a Hub model or the default one fetched (with its progress on stderr), before the
    screen is taken over."""
    from diptych.backends import resolve
    from diptych.sources.default_model import default_model_path
    from diptych.sources.hub import local_path, not_found
    from diptych.tui.chat_settings import ChatSettings

    from .main import _sampling

    draft = str(local_path(args.draft)) if args.draft is not None else None
    settings = ChatSettings(system=args.system or "", max_tokens=args.max_tokens,
                            speculative="lookup" if args.lookup else "draft" if draft else None,
                            draft=draft, lookup_ngram=args.lookup_ngram, **_sampling(args))
    settings.validate()
    resolve(args.backend)
    source = local_path(args.model) if args.model is not None else default_model_path()
    for given, path in ((args.model, source), (args.adapter, args.adapter), (draft, draft)):
        if path is not None and not Path(path).expanduser().exists():
            raise ModelFileError(not_found(given) if given == args.model
                                 else f"{given}: no such file or folder")
    return dict(source=source, backend=args.backend, n_ctx=args.n_ctx, settings=settings,
                adapter=args.adapter, draft_max=args.draft_max)


def cmd_chat(args) -> int:
    from diptych.tui import run_app

    options = app_options(args)
    run_app(options.pop("source"), **options)
    return 0

"""`diptych serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn, the `[server]`
extra).

    app.py         routes, API key, body size, CORS; errors as OpenAI's error bodies
    validate.py    a request's JSON -> `GenerationRequest` (or an `APIError`, never a traceback)
    scheduler.py   the worker thread that runs every generation, over the slots
    slots.py       the cache slots: longest-common-prefix matching, least-recently-used reuse
    responses.py   OpenAI's response and stream-chunk shapes, usage, logprobs
    tool_calls.py  tool calls in the model's output -> `tool_calls`
"""

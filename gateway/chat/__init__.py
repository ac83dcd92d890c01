"""``POST /v1/chat/completions``: the request and chat objects (``protocol.py``), the renderer and
the handler (``serving.py``)."""

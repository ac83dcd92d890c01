"""``POST /v1/completions`` (legacy text completions): the request and ``text_completion`` objects
(``protocol.py``), the renderer and the handler (``serving.py``)."""

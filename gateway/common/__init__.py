"""What several endpoints share: vLLM's sampling extensions and the shared wire Structs
(``protocol.py``), the door's bounds (``bounds.py``), request decoding (``decoding.py``), and the
text-generation side of the flow that chat and completions have in common (``generation.py``),
and ``@get_and_head``, the declaration of every GET route (``routing.py``)."""

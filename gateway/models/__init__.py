"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the models a request may name now (live or cold)."""

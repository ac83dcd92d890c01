"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the models with a live engine now."""

"""``/v1/images/generations`` and the images it serves (``/v1/images/files/{ref}``)."""

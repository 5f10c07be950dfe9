"""The upload function: ``request_upload`` signs PUT URLs, ``on_upload_finalized`` accepts or refuses objects."""

"""What every process of the chat applies at start-up: JSON logging (``jsonlog``), GC tuning (``tuning``),
and the functions' per-process runtime built once on first use (``once``)."""

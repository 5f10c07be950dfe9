"""What every process of the chat applies at start-up: JSON logging (``jsonlog``) and GC tuning (``tuning``)."""

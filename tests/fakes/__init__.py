"""Local fakes of remote LLM APIs that speak the real streaming wire formats.

Each fake is a small aiohttp server on a free 127.0.0.1 port. It records
every request it receives and answers in the byte format of the real API
(SSE framing, JSON shapes, finish reasons, error bodies). A fake is used in
two ways:

- in pytest, as an async context manager::

      async with OpenAIFakeServer(text="Hello there") as server:
          provider = OpenAICompatibleProvider(server.url, ...)
          ...
          assert server.requests[0].body["model"] == "gpt-test"

- as a process, for end-to-end runs of the real function::

      python -m tests.fakes.openai_server --port 0 --mode ok
      python -m tests.fakes.gemini_server --port 0 --mode hang

  It prints ``READY <base url>`` once it listens. ``GET /_fake/requests``
  returns what it recorded, ``POST /_fake/config`` changes the behaviour
  (``{"mode": ..., "text": ..., "delay": ...}``) and ``POST /_fake/reset``
  forgets the recorded requests.

helpers.py holds what tests of the fakes' clients share (a ``server``
fixture, a fake run as a process); local_http.py holds small local HTTP
endpoints whose answers a test writes itself.

The submodules are not imported here, so that ``python -m`` runs each of
them exactly once.
"""

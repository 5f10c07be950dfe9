"""The Cloud Run Socket.IO service: connections, JWT auth, rooms, HTTP API."""

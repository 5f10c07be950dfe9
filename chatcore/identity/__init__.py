"""Who is calling, and what may be fetched: JWT verification and dev tokens (``auth``), signed URLs (``signing``)."""

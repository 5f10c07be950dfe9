"""The AI reply function: streams an LLM reply to a conversation's room, chunk by chunk."""

"""On the line: the audit trail of every verdict, verdict dispatch (JSON lines, webhooks, MQTT) and the hot folder."""

"""The NodePass master: REST API, SSE and durable state for many instances
in one reactor.  ``MasterService`` is the entry point."""

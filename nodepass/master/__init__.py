"""The NodePass master: REST API, SSE and durable state for many instances
in one reactor.  ``service.MasterService`` is the entry point; it owns the
domain (``domain.Master``), the Klein app in front of it (``api.MasterAPI``)
and the SSE hub (``events.EventHub``)."""

"""llm-edge-proxy: an OpenAI-compatible LLM gateway for gunicorn on bare-metal hosts.

Architecture: the process model and one request's path, with the module that owns each step.

    systemd ─ gunicorn master ............ edge.server.master (gunicorn.conf.py's hooks): reads
      │                                    and validates the Config (edge.config), loads the keys
      │                                    (edge.auth) and providers (edge.routing.providers),
      │                                    creates the shared-memory tables (edge.ratelimit.shm,
      │                                    edge.routing.breaker) and the metrics directory, folds
      │                                    dead workers' metric files (edge.observability.
      │                                    metric_files), cleans up on exit
      ├─ worker ........................... edge.server.worker: uvicorn (or, for h2, gunicorn's
      ├─ worker                            ASGI worker) + edge.server.protocol (HTTP/1.1 limits,
      └─ …                                 deadlines, h2c, HTTP/1.0, lingering close); per-worker
                                           resources opened after fork: edge.runtime

    request ─ edge.server.protocol ─ edge.app (Falcon, create_app)
      → edge.middleware.EdgeMiddleware     request id, trace context (edge.observability.context)
      → route matched (edge.endpoints.routes: which endpoint this is; unmatched → 404)
      → authenticate (edge.auth)           → limit (edge.ratelimit: shm table or Redis)
      → endpoint (edge.endpoints.openai, .passthrough, .anthropic, .health, .metrics); the
        forwarding ones share edge.endpoints.exchange (body rules: .body)
          → token reservation (edge.ratelimit.tokens)
          → route to providers (edge.routing.router, .breaker) → exchange (edge.upstream.client;
            SSE relayed as whole events: edge.upstream.sse) or the built-in mock (.mock); what
            the exchange came to is one UpstreamOutcome (edge.routing.outcome), which the router
            records on the request context once
      → response: metrics (edge.observability.metrics), one access line (.logs), both reading
        the recorded outcome
    errors anywhere → edge.errors (the OpenAI envelope; Anthropic's on /v1/messages)
    the client hanging up at any point → edge.server.disconnect
"""

__version__ = "0.1.0"

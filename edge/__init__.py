"""llm-edge-proxy: an OpenAI-compatible LLM gateway for gunicorn on bare-metal hosts.

The code map: the process model and one request's path, with the module that owns each step
(docs/architecture.md tells the same story at length).

    systemd ─ gunicorn master ............ edge.server.master (gunicorn.conf.py's hooks): reads
      │                                    and validates the Config (edge.config, the only
      │                                    reader of the environment), loads the keys
      │                                    (edge.auth) and providers (edge.routing.providers),
      │                                    creates the host-wide shared-memory tables
      │                                    (edge.shm), prepares the metrics directory and folds
      │                                    dead workers' files (edge.observability.
      │                                    metric_files), cleans up on exit
      ├─ worker ........................... edge.server.worker: uvicorn (or, for h2, gunicorn's
      ├─ worker                            ASGI worker) + edge.server.protocol (HTTP/1.1 limits,
      └─ …                                 deadlines, h2c, HTTP/1.0, lingering close); every
                                           object it holds built in one place after the fork:
                                           edge.runtime.Runtime.build

    request ─ edge.server.protocol ─ edge.app (Falcon, create_app: the route table)
      → edge.middleware                    request id and trace context (edge.observability.
                                           context); the matched route (edge.endpoints.routes:
                                           which endpoint, which API); the key (edge.auth); the
                                           request limit (edge.ratelimit: shm table or Redis)
                                           and the key's requests in flight (.parallel)
      → endpoint (edge.endpoints.openai, .passthrough, .anthropic; .body reads and validates)
      → edge.pipeline                      one path for every forwarding endpoint:
          → the response cache, edge.cache   a hit answered from the host's store (.local,
                                           Redis behind it: .remote); identical requests
                                           coalesced host-wide (.flights); .key, .answers
          → token limit (edge.ratelimit.tokens)
          → Layer 2, edge.routing.router   targets, host-wide breakers (edge.routing.breaker),
                                           failover; the built-in mock is a provider here
                                           (edge.routing.mock); [adapters plug in here]
          → transport, edge.upstream       the HTTP/1.1 client (.http1, .client); streams
                                           relayed as whole SSE events (.sse)
          ← one exchange (edge.routing.exchange): a whole answer, or events that report
            their verdict to the breaker when they end; what it came to is one
            UpstreamOutcome (edge.routing.outcome)
          → settled to the usage reported (edge.usage); stored in the cache; the
            response written
      → response: metrics (edge.observability.metrics), one access line (.logs), both reading
        the recorded outcome
    errors anywhere → edge.errors (every shape: OpenAI's, Anthropic's, their stream events)
    the client hanging up at any point → edge.server.disconnect
"""

__version__ = "0.1.0"
